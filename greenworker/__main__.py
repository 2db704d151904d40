"""``python -m greenworker``: the same as the ``greenworker`` command."""

from .cli import main

main(prog_name="greenworker")
