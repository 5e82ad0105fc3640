import click
from click.core import ParameterSource

from listener.cli.options import connection_options, operator_settings, setup_logging
from listener.connection import ConnectionProblem, has_password
from training import collector


@click.command()
@connection_options
@click.option("--uri-file", type=click.Path(dir_okay=False), default=None,
              help="Read the URI from this file, so its password never shows in `ps` (or $MONGOTUNE_URI_FILE).")
@click.option("--name", default=None, help="This daemon's name (default: the host name); its resume tokens are kept "
              "under it, so keep it across restarts.")
@click.option("--max-jobs", type=int, default=None, help="Trainings this daemon runs at once (default 1).")
@click.option("--gpus", default=None, metavar="IDS",
              help="GPU ids this daemon gives its trainings, e.g. 0,1,2,3; 'none' for the CPU only (default: every "
                   "visible GPU). Each job takes trainer.num_gpus of them; a job that does not fit waits.")
@click.option("--advertise-addr", default=None, metavar="ADDR",
              help="The address other hosts reach this one at, for jobs of several nodes (trainer.num_nodes) this "
                   "daemon is node 0 of; their rendezvous port comes from MONGOTUNE_RENDEZVOUS_PORTS "
                   "(default 127.0.0.1: one host only).")
@click.option("--model-root", "model_roots", multiple=True, type=click.Path(file_okay=False),
              help="A folder documents may load base models from; repeat for more (default: the models cache).")
@click.option("--validators/--no-validators", default=None,
              help="Install $jsonSchema validators so bad inserts are refused at write time (default on).")
@click.option("--set", "assignments", multiple=True, metavar="NAME=VALUE",
              help="Any other setting or cap by name, e.g. --set max_steps=5000 --set request_timeout_s=60; "
                   "each is also MONGOTUNE_<NAME> (see the README's table).")
@click.option("--metrics-port", type=int, default=None, metavar="PORT",
              help="Serve Prometheus metrics on /metrics and this daemon's health on /healthz (default off; "
                   "address: MONGOTUNE_METRICS_HOST, default 127.0.0.1).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
              help="json: one JSON object per line (time, level, logger, message) for log shippers (default text).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def start(uri, db, uri_file, name, max_jobs, gpus, advertise_addr, model_roots, validators, assignments, metrics_port, log_format, verbose):
    """Watch the database: train pending models and answer pending requests until stopped.

    \b
    Example:
      MONGOTUNE_URI_FILE=/etc/mongotune/uri listener start --db mydb --model-root /srv/models
    """
    with collector.paused():  # the daemon's modules, beyond the command's
        from listener.daemon import serve

    settings = operator_settings(assignments, uri=uri, db=db, uri_file=uri_file, name=name, max_jobs=max_jobs, gpus=gpus,
                                 validators=validators, model_roots=model_roots, metrics_port=metrics_port,
                                 log_format=log_format, advertise_addr=advertise_addr)
    setup_logging(verbose, settings.log_format)
    typed = click.get_current_context().get_parameter_source("uri") is ParameterSource.COMMANDLINE
    if typed and has_password(uri):
        click.echo("warning: --uri holds a password, which every local user can read in `ps`; "
                   "use MONGOTUNE_URI or --uri-file instead", err=True)
    try:
        serve(settings)
    except (ConnectionProblem, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
