import click
from pymongo import MongoClient
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from listener import imports
from listener.cli.options import connection_options, resolve

EXAMPLES = """
\b
Examples:
  listener import-data chats.jsonl --collection pirate_chat
  listener import-data reviews.csv --collection reviews --fold train --limit 1000
  listener import-data stanfordnlp/imdb --collection imdb --split train --split test --offline
  listener import-data --samples                      # all three pirate samples, same collection names
  listener import-data --samples pirate_chat --collection my_chat --drop
"""


@click.command("import-data", epilog=EXAMPLES)
@connection_options
@click.argument("source", required=False)
@click.option("--collection", metavar="NAME", help="Where the documents go (with --samples: default, each sample's name).")
@click.option("--samples", is_flag=True, help=f"SOURCE is a shipped sample ({', '.join(imports.SAMPLES)}); none: all.")
@click.option("--split", "splits", multiple=True, metavar="NAME",
              help="A dataset split to import (repeatable; default all). train → fold 'train'; "
                   "validation/test/dev → 'valid'.")
@click.option("--config", metavar="NAME", help="The dataset's configuration (subset) name.")
@click.option("--fold", type=click.Choice([imports.TRAIN, imports.VALID]),
              help="Put every imported document in this fold, whatever its split or own field says.")
@click.option("--fold-field", default="_fold", show_default=True, help="The field the fold goes in (data.fold_field).")
@click.option("--limit", type=click.IntRange(min=1), help="Import at most this many documents in all.")
@click.option("--drop", is_flag=True, help="Empty the collection first.")
@click.option("--offline", is_flag=True, help="Never ask the Hugging Face Hub: only datasets already in the local cache.")
def import_data(uri, db, source, collection, samples, splits, config, fold, fold_field, limit, drop, offline):
    """Load training documents from SOURCE into a collection, in batches, with a progress bar.

    SOURCE is a local .json (an array, or one object per line), .jsonl, .csv or .parquet file, or a
    Hugging Face dataset id read through `datasets` (a split becomes the fold the trainer reads).
    Values MongoDB cannot hold are converted: NaN and missing CSV cells become null, numpy numbers
    plain numbers.
    """
    if not samples and not source:
        raise click.UsageError("give a SOURCE (file or dataset id), or --samples")
    if not samples and not collection:
        raise click.UsageError("give --collection NAME: where the documents go")
    if samples and collection and not source:
        raise click.UsageError(f"with --collection, name one sample: {', '.join(imports.SAMPLES)}")
    if collection and (collection.startswith(("_", "system.")) or "$" in collection):
        raise click.ClickException(f"--collection {collection}: use a plain name; names starting with _ or system. "
                                   "are the listener's and the server's, and no document may train on them")
    try:
        parts = (imports.sample_parts([source] if source else imports.SAMPLES, fold) if samples
                 else imports.parts_of(source, config=config, splits=splits, fold=fold, offline=offline))
        uri, name = resolve(uri, db)
        database = MongoClient(uri)[name]
        counts = _insert_all(database, parts, collection, fold_field, limit, drop)
    except imports.ImportFailed as exc:
        raise click.ClickException(str(exc)) from None
    for target, count in counts.items():
        click.echo(f"{count} documents in {name}.{target}")


def _insert_all(database, parts, collection, fold_field, limit, drop) -> dict[str, int]:
    counts: dict[str, int] = {}
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        for part in parts:
            left = None if limit is None else limit - sum(counts.values())
            if left == 0:
                break
            target = database[collection or part.name]
            if drop and target.name not in counts:
                target.drop()
            total = part.total if left is None or part.total is None else min(part.total, left)
            task = bar.add_task(f"{part.name} → {target.name}", total=total)
            done = imports.insert(target, part, fold_field=fold_field, limit=left,
                                  advance=lambda n, task=task: bar.advance(task, n))
            counts[target.name] = counts.get(target.name, 0) + done
    return counts
