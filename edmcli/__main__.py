"""``python -m edmcli`` (e.g. under ``torchrun -m edmcli``) runs the echo-synth CLI."""

from edmcli.cli import main

main()
