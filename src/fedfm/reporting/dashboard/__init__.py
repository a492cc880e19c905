"""The live dashboard (``fedfm dashboard RUN [RUN ...]``, ``fedfm server --dashboard PORT``):
a Starlette app that streams what run folders record, as they record it, to a page in a browser."""
