"""The client's work: the client program every engine runs (``program``), the training of groups
of clients in one pass (``groups``), the steps both share (``steps``), and cost counting
(``costs``)."""
