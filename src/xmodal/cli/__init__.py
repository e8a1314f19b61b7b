"""The ``xmodal`` command line. See :func:`xmodal.cli.main.main`."""
