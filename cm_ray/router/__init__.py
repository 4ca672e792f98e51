"""The culture router: its classifier (``model``) and the ``route`` stage training it (``stage``)."""
