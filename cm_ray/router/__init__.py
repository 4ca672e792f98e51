"""The culture router: the classifier (``model``) and the ``route`` stage that trains it (``stage``)."""
