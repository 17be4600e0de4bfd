"""The ``aligngate`` command line (``main``: serve, render, export, alpaca-eval, bench,
default-model; ``training``: train, merge, align).

Owns: argument parsing, logging set-up and exit codes. Does not know: anything the commands
do; each one calls into its package.
"""
