"""One module per ``seqlab`` verb (see ``seqlab.cli``)."""
