from listener.cli.main import cli

cli(prog_name="listener")
