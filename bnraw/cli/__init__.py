"""The command line: flags map onto ``bnraw.config``, one module per command, and
:mod:`~bnraw.cli.app` owns every exit status."""
