"""Loopback stand-ins for the rehearsal of a production run: the outside services a run talks to,
served on 127.0.0.1 in the formats those services document, so the whole pipeline runs offline."""
