"""The `listener` command, as `python -m listener` and as the installed `listener` script."""

from training import collector


def main() -> None:
    with collector.paused():  # a command's imports: a quarter less CPU to start each command and daemon
        from listener.cli.main import cli
    cli(prog_name="listener")


if __name__ == "__main__":
    main()
