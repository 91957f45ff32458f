"""The ``resnet-pipeline`` command: parse, call, print."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Batch image labeling with ResNet on Ray.")
weights_app = typer.Typer(no_args_is_help=True, help="Stage and inspect model weights.")
app.add_typer(weights_app, name="weights")
console = Console()
errors = Console(stderr=True, soft_wrap=True)


def _quiet_tensorflow(verbose: bool = False) -> None:
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


SetOption = typer.Option([], "--set", help="Override a spec field: --set model.top_k=3 (repeatable).")
AddressOption = typer.Option(None, "--address", envvar="RAY_ADDRESS", help="Ray cluster; default: start a local one.")
VerboseOption = typer.Option(
    False, "--verbose", help="Ray Data's own progress and logs, and the model workers' full start-up output."
)


CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 but newline and tab, DEL, C1


def _printable(value: object) -> str:
    """A value as it may reach a terminal: control characters (ESC, ...) written out as ``\\x1b``, never sent."""
    return CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", str(value))


def _text(value: object, style: str = "") -> Text:
    """A value as Rich text: shown as it is, never read as markup (``[/b]``) or emoji (``:x:``)."""
    return Text(_printable(value), style=style)


def _say(message: object, style: str = "", to: Console = console) -> None:
    """One message (lines of it never wrapped): what we print is data, image ids and paths among it."""
    to.print(_text(message, style), soft_wrap=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    _say(message, "red", to=errors)
    return typer.Exit(code)


def _architecture(depth: int) -> str:
    from pipeline.spec import DEPTHS

    if depth not in DEPTHS:
        raise _fail(f"depth must be one of {sorted(DEPTHS)}, got {depth}")
    return DEPTHS[depth]


INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)


def _run_job(
    spec, address: str | None, quiet: bool, full: bool = False, retry_failed: bool = False, verbose: bool = False
):
    from pipeline.runner import PreflightError, RunConflict, RunFailed, RunStopped, run
    from pipeline.sources import InputError

    try:
        return run(spec, address=address, progress=not quiet, full=full, retry_failed=retry_failed, verbose=verbose)
    except (InputError, PreflightError) as error:
        raise _fail(str(error)) from None
    except (RunFailed, RunConflict) as error:
        raise _fail(str(error), code=1) from None
    except RunStopped as error:
        raise _fail(str(error), code=INTERRUPTED) from None
    except KeyboardInterrupt:
        raise _fail(
            "stopped at once: what was written is kept; rerun the same command to finish (it adopts it)",
            code=INTERRUPTED,
        ) from None
    except Exception as error:  # Ray has already logged the workers' tracebacks; end with the cause in one line
        raise _fail(f"run failed: {_root_cause(error)}", code=1) from None


def _root_cause(error: BaseException) -> str:
    """One line that says why: the innermost of our own errors if a worker raised one, else the last error line.

    Ray wraps an exception raised in an actor into its own, with the worker's traceback as text.
    """
    exception_line = re.compile(r"^\s*([\w.]+(?:Error|Exception)): (.+)$")
    ours, last = None, None
    chain: BaseException | None = error
    while chain is not None:
        for line in str(chain).splitlines():
            if match := exception_line.match(line):
                last = f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}"
                if match.group(1).startswith("pipeline."):
                    ours = match.group(2)
        chain = chain.__cause__ or chain.__context__
    return ours or last or f"{type(error).__name__}: {str(error).strip()[:300]}"


def _skipped_lines(counts) -> list[str]:
    """What the listing and the reads skipped, by reason with the first names, and the keys renamed."""
    lines = []
    if counts.listed.skipped:
        lines.append(f"  not listed  {counts.listed.describe_skipped()}")
    if counts.read.skipped:
        lines.append(f"  not read    {counts.read.describe_skipped()}")
    renamed = counts.read.renamed
    if renamed.count:
        lines.append(f"  renamed     {renamed.count} keys repeated in a shard, suffixed ~<position>: {renamed.names()}")
    return lines


def _summary(result) -> None:
    plan = result.plan
    shards = f"{plan.to_read} read, {plan.skipped_unchanged} unchanged, {plan.adopted} adopted"
    if result.version is None:
        _say(f"Nothing to do ({plan.mode} run over {plan.listed} shards: {shards}).")
        for line in _skipped_lines(result.input):
            _say(line)
        _say(f"  output      {result.output_url} (no run committed)")
        return
    stages = ", ".join(f"{name} {value['seconds']:.1f}s" for name, value in result.stage_seconds.items())
    predict = result.stage_seconds.get("predict", {})
    once_running = (
        f"; {predict['items'] / predict['span_seconds']:.1f} images/s once predicting"
        if predict.get("span_seconds")
        else ""
    )
    adopted = f" (progress of crashed run {', '.join(plan.adopted_from)})" if plan.adopted_from else ""
    lines = [
        f"  shards      {plan.listed} listed: {shards}{adopted}",
        *_skipped_lines(result.input),
        f"  images      {result.rows} ({result.ok} ok, {result.error} failed)",
        f"  throughput  {result.images_per_second:.1f} images/s over {result.wall_seconds:.1f} s{once_running}",
        f"  stages      {stages}",
        f"  output      {result.output_url}",
        f"  committed   version {result.version} of the Delta table {result.output_url.rstrip('/')}/predictions",
    ]
    head = Text.assemble(_text(f"run {result.run_id}", "bold"), _text(f" ({plan.mode})"))
    console.print(head, _text("\n".join(lines)), sep="\n", soft_wrap=True)


@app.command("run")
def run_command(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="Job spec (YAML)."),
    overrides: list[str] = SetOption,
    address: str | None = AddressOption,
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    verbose: bool = VerboseOption,
    full: bool = typer.Option(False, "--full", help="Process every shard, even with incremental: true."),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="Read again only the images whose newest committed row is an error."
    ),
) -> None:
    """Run a labeling job: read images, predict with ResNet on Ray, write Parquet."""
    _quiet_tensorflow(verbose)
    from pipeline.spec import SpecError, load_spec

    if full and retry_failed:
        raise _fail("--full and --retry-failed exclude each other")
    try:
        spec = load_spec(spec_path, overrides)
    except SpecError as error:
        raise _fail(str(error)) from None
    _summary(_run_job(spec, address, quiet, full=full, retry_failed=retry_failed, verbose=verbose))


@app.command("retry-failed")
def retry_failed_command(
    output: str = typer.Argument(..., metavar="OUTPUT", help="An output location (path or URL) with committed runs."),
    overrides: list[str] = SetOption,
    address: str | None = AddressOption,
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    verbose: bool = VerboseOption,
) -> None:
    """Read again the images that ended in error, with the spec of the output's newest run; new rows supersede.

    Credentials are not stored in manifests: they come from the environment, or give them with --set.
    """
    _quiet_tensorflow(verbose)
    from pipeline.credentials import without_redacted
    from pipeline.runs import OutputLocation
    from pipeline.spec import SpecError, parse_spec
    from pipeline.tables import LegacyOutputError, check_format, read_manifests

    location = OutputLocation.open(output)
    try:
        check_format(location)
    except LegacyOutputError as error:
        raise _fail(str(error)) from None
    manifests = read_manifests(location)
    if not manifests:
        raise _fail(f"{output}: no committed run to retry")
    document = without_redacted(manifests[-1].spec)
    document["output"]["url"] = output
    try:
        spec = parse_spec(document, overrides)
    except SpecError as error:
        raise _fail(str(error)) from None
    _summary(_run_job(spec, address, quiet, retry_failed=True, verbose=verbose))


FormatOption = typer.Option("table", "--format", help="table | csv | json | parquet (parquet needs --output).")
OutputFileOption = typer.Option(
    None, "--output", "-o", help="Write to this file instead of the terminal (csv, json, parquet: every row)."
)
MaxRowsOption = typer.Option(
    1000, "--max-rows", min=1, help="Table format: show at most this many rows (all of them: a format and -o)."
)


AsOfOption = typer.Option(
    None,
    "--as-of",
    help="The output as it was: a version of the predictions table (see the runs view) or a time (ISO 8601, UTC).",
)


def _connect(output: str, safe: bool = False, as_of: str | None = None):
    from pipeline.query import connect

    moment: int | datetime | None = None
    if as_of is not None:
        try:
            moment = int(as_of) if as_of.isdigit() else datetime.fromisoformat(as_of)
        except ValueError:
            raise _fail(f"--as-of: {as_of!r} is neither a version number nor an ISO 8601 time") from None
        if isinstance(moment, datetime) and moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
    try:
        return connect(output, safe=safe, as_of=moment)
    except Exception as error:
        raise _fail(f"cannot read {output}: {error}") from None


def _emit(
    db,
    query,
    output_format: str,
    output_file: Path | None,
    max_rows: int,
    title: Callable[[str], str] | None = None,
) -> None:
    """A query's rows as a terminal table (the first ``max_rows``), CSV, JSON lines or Parquet, streamed: DuckDB
    writes files, and the terminal gets a batch at a time. CSV leaves out nested columns (top_k, embedding)."""
    import duckdb

    from pipeline.query import BATCH_ROWS, FORMATS, QueryError, export, relation, text_lines

    if output_format not in ("table", *FORMATS):
        raise _fail(f"--format must be table, csv, json or parquet, got {output_format!r}")
    if output_format == "parquet" and output_file is None:
        raise _fail("--format parquet needs --output FILE")
    try:
        if output_format != "table" and output_file is not None:
            export(db, query, output_format, output_file)
            return
        result = relation(db, query, output_format)
        if result is None:
            return
        with result.to_arrow_reader(BATCH_ROWS) as reader:
            if output_format == "table":
                _print_table(reader, max_rows, output_file, title)
            else:
                for text in text_lines(reader, output_format):
                    typer.echo(text, nl=False)
    except (duckdb.Error, QueryError) as error:
        raise _fail(f"query failed: {error}") from None


def _print_table(reader, max_rows: int, output_file: Path | None, title: Callable[[str], str] | None) -> None:
    """The first ``max_rows`` rows; the rest is never read, and a line under the table says it was cut."""
    from pipeline.query import rows

    shown: list[tuple] = []
    for batch in reader:
        shown += rows(batch.slice(0, max_rows + 1 - len(shown)))
        if len(shown) > max_rows:
            break
    cut = len(shown) > max_rows
    view = Table(title=_text(title(f"first {max_rows:,}" if cut else f"{len(shown):,}")) if title else None)
    for name in reader.schema.names:
        view.add_column(_text(name), overflow="fold")  # ids are wrapped, never cut: they are meant to be copied
    for row in shown[:max_rows]:
        view.add_row(*(_cell(value) for value in row))
    notice = f"(the first {max_rows:,} rows; more were cut: every row with --format csv|json|parquet -o FILE)"
    if output_file is None:
        console.print(view)
        if cut:
            _say(notice)
    else:
        with output_file.open("w") as f:
            to = Console(file=f, width=200)
            to.print(view)
            if cut:
                _say(notice, to=to)


def _cell(value) -> Text:
    if value is None:
        return Text("")
    if isinstance(value, float):
        return Text(f"{value:.4f}")
    if isinstance(value, list) and len(value) > 8:
        return Text(f"[{len(value)} values]")
    return _text(value)


@app.command()
def query(
    output: str = typer.Argument(..., metavar="OUTPUT", help="An output location (path or URL)."),
    sql: str = typer.Argument(..., help="SQL over the views predictions, latest, errors, runs, shards."),
    output_format: str = FormatOption,
    output_file: Path | None = OutputFileOption,
    max_rows: int = MaxRowsOption,
    safe: bool = typer.Option(
        False,
        "--safe",
        help="Read-only SQL: the views and nothing else (no files, URLs, ATTACH, INSTALL or SET); -o still writes.",
    ),
    as_of: str | None = AsOfOption,
) -> None:
    """SQL over the committed runs of an output (DuckDB). Uncommitted and crashed runs are never seen.

    The SQL runs as given, with this user's access to files (read_csv, COPY, ATTACH) and extensions (INSTALL):
    for SQL from someone else, as behind a service, use --safe.
    """
    from pipeline.query import Query

    with _connect(output, safe, as_of) as db:
        _emit(db, Query(sql), output_format, output_file, max_rows)


@app.command()
def search(
    output: str = typer.Argument(..., metavar="OUTPUT", help="An output location (path or URL)."),
    label: str = typer.Option(..., "--label", help="A class name (tench, 'crane (bird)') or WordNet id (n01440764)."),
    min_score: float = typer.Option(0.0, "--min-score", min=0.0, max=1.0, help="Lowest score for that label."),
    in_top_k: int = typer.Option(1, "--in-top-k", min=1, help="Match the label among the first K labels."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="At most this many images."),
    output_format: str = FormatOption,
    output_file: Path | None = OutputFileOption,
    max_rows: int = MaxRowsOption,
) -> None:
    """Images carrying a label (newest result per image), best score first."""
    from pipeline.query import QueryError, search_query

    with _connect(output) as db:
        try:
            found = search_query(db, label, min_score=min_score, in_top_k=in_top_k, limit=limit)
        except QueryError as error:
            raise _fail(str(error)) from None
        _emit(db, found, output_format, output_file, max_rows, title=lambda count: f"{count} images labeled {label!r}")


@app.command()
def similar(
    output: str = typer.Argument(..., metavar="OUTPUT", help="An output location (path or URL)."),
    image_id: str = typer.Argument(..., metavar="IMAGE_ID", help="The image to start from (its full id)."),
    k: int = typer.Option(10, "-k", min=1, help="How many images, the image itself first."),
    exact: bool = typer.Option(False, "--exact", help="Exact search over every embedding, even with an index."),
    nprobes: int | None = typer.Option(
        None,
        "--nprobes",
        min=1,
        help="Index: IVF partitions searched (default: 1/16 of them, at least 20; more: better recall, slower).",
    ),
    refine: int | None = typer.Option(
        None, "--refine", min=0, help="Index: re-rank refine x k candidates exactly (default 50; 0: PQ estimates)."
    ),
    output_format: str = FormatOption,
    output_file: Path | None = OutputFileOption,
    max_rows: int = MaxRowsOption,
) -> None:
    """Nearest images by cosine similarity of their embeddings: through the output's index when it has one
    (`resnet-pipeline index`), else (or with --exact) exact search."""
    import warnings

    from pipeline.query import QueryError, similar_query
    from pipeline.vector_index import StaleIndexWarning

    with _connect(output) as db:
        index = None if exact else _open_index(output)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", StaleIndexWarning)
                nearest = similar_query(db, image_id, k, index, nprobes=nprobes, refine=refine)
        except QueryError as error:
            raise _fail(str(error)) from None
        for warning in caught:
            _say(f"warning: {warning.message}", "yellow", to=errors)
        _emit(db, nearest, output_format, output_file, max_rows)


def _open_index(output: str):
    """The output's similarity index, or None (none built, or pylance missing: then exact search, said once)."""
    from pipeline.query import QueryError
    from pipeline.vector_index import open_index

    try:
        return open_index(output)
    except ModuleNotFoundError:
        _say("warning: the output has an index but pylance is not installed (pip install 'resnet-pipeline[index]'): "
             "exact search", "yellow", to=errors)  # fmt: skip
        return None
    except QueryError as error:
        raise _fail(str(error)) from None


@app.command("index")
def index_command(
    output: str = typer.Argument(..., metavar="OUTPUT", help="An output location (path or URL)."),
    partitions: int | None = typer.Option(
        None, "--partitions", min=1, help="IVF partitions (default: about the square root of the rows)."
    ),
    sub_vectors: int | None = typer.Option(
        None, "--sub-vectors", min=1, help="PQ sub-vectors, dividing the dimension (default: dimension / 16)."
    ),
) -> None:
    """Build or rebuild the similarity index of an output (IVF-PQ, cosine) from its latest results, under
    OUTPUT/_index/; `similar` then uses it. Rebuild after new runs: `similar` says when it is behind."""
    from pipeline.credentials import redact_url
    from pipeline.query import QueryError

    try:
        from pipeline.vector_index import build
    except ModuleNotFoundError as error:
        raise _fail(f"{error.name} is missing: pip install 'resnet-pipeline[index]'") from None
    try:
        record = build(output, num_partitions=partitions, num_sub_vectors=sub_vectors)
    except QueryError as error:
        raise _fail(str(error)) from None
    except Exception as error:
        raise _fail(f"cannot index {redact_url(output)}: {error}") from None
    layout = (
        f"{record.num_partitions} partitions x {record.num_sub_vectors} sub-vectors"
        if record.num_partitions
        else "no IVF-PQ: too few rows, searched exactly"
    )
    _say(
        f"indexed {record.rows:,} embeddings of {record.dimension} values ({layout}) at predictions version "
        f"{record.predictions_version}, in {record.build_seconds:.1f} s"
    )


@app.command()
def report(
    output: str = typer.Argument(..., metavar="OUTPUT", help="An output location (path or URL)."),
    run_id: str | None = typer.Option(None, "--run", help="One run's rows (default: the newest row per image)."),
    html_file: Path | None = typer.Option(None, "--html", help="Also write a self-contained HTML page here."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Counts, error reasons, throughput and time per stage, top labels, score distribution."""
    from pipeline.query import QueryError
    from pipeline.report import report as gather
    from pipeline.report import to_html, to_text

    try:
        data = gather(output, run_id)
    except QueryError as error:
        raise _fail(str(error)) from None
    except Exception as error:
        raise _fail(f"cannot read {output}: {error}") from None
    typer.echo(json.dumps(data, indent=2, default=str) if as_json else _printable(to_text(data)))
    if html_file is not None:
        html_file.write_text(to_html(data), encoding="utf-8")
        _say(f"wrote {html_file}", to=errors)


@app.command("migrate")
def migrate_command(
    output: str = typer.Argument(..., metavar="OUTPUT", help="An output location (path or URL) of the old format."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be done, and do nothing."),
) -> None:
    """Convert an output of the old format (manifests under _runs/) into its Delta Lake tables, in place.

    Each old run is committed again, in the old commit order; the old manifests go only once every run is
    committed. Cut short, it resumes when run again; on an output that is Delta Lake already it does nothing.
    """
    from pipeline.migrate import AlreadyDelta, MigrationError, NotAnOutput, migrate
    from pipeline.runs import OutputLocation

    try:
        summary = migrate(OutputLocation.open(output), dry_run=dry_run, say=_say)
    except AlreadyDelta as done:
        _say(str(done))
        return
    except NotAnOutput as error:
        raise _fail(str(error)) from None
    except MigrationError as error:
        raise _fail(str(error), code=1) from None
    except Exception as error:
        raise _fail(
            f"migration stopped: {_root_cause(error)}; run it again to resume (the old manifests stay until every "
            "run is committed)",
            code=1,
        ) from None
    _say("\n".join(summary.lines()))


@app.command()
def demo(
    workdir: Path = typer.Option(Path("resnet-demo"), help="Folder for the sample images and the output."),
    overrides: list[str] = SetOption,
    download_weights: bool = typer.Option(
        False, "--download-weights", help="Download Keras's ImageNet weights if they are not cached."
    ),
    top_k: int = typer.Option(5, min=1, max=20, help="Labels shown per image."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    verbose: bool = VerboseOption,
) -> None:
    """The whole job on local sample photos: builds the samples, runs locally, prints the top labels."""
    _quiet_tensorflow(verbose)
    from pipeline.samples import write_samples
    from pipeline.spec import SpecError, parse_spec

    images = workdir.resolve() / "images"
    document = {
        "name": "demo",
        "input": {"url": str(images)},
        "output": {"url": str(workdir.resolve() / "output")},
        "model": {"depth": 50, "weights": "imagenet", "top_k": top_k, "allow_download": download_weights},
        "inference": {"batch_size": 16},
    }
    try:
        spec = parse_spec(document, overrides)
    except SpecError as error:
        raise _fail(str(error)) from None
    write_samples(images)
    _say(f"Sample images: {images}")
    if spec.model.weights == "imagenet" and not download_weights:
        from pipeline.model.weights import WeightsError, imagenet_file

        try:
            imagenet_file(spec.model.architecture, include_top=True)
        except WeightsError as error:
            raise _fail(
                f"{error}\n  - or let the demo download them: resnet-pipeline demo --download-weights\n"
                "  - or run the demo with random weights: resnet-pipeline demo --set model.weights=random"
            ) from None
    result = _run_job(spec, None, quiet, verbose=verbose)
    if spec.model.weights == "random":
        _say("Random weights: the labels below are meaningless (a smoke test, not a result).", "yellow", to=errors)
    _print_top_labels(result, spec.output.url)
    _summary(result)


def _print_top_labels(result, output_url: str) -> None:
    from pipeline.query import connect, fetch_arrow

    with connect(output_url) as db:
        rows = fetch_arrow(
            db,
            "SELECT image_id, status, error, top_k FROM predictions WHERE run_id = $run ORDER BY image_id",
            {"run": result.run_id},
        ).to_pylist()
    table = Table(title="top labels per image")
    table.add_column("image")
    table.add_column("labels (score)")
    for row in rows:
        name = _text(Path(row["image_id"]).name)
        if row["status"] == "ok":
            table.add_row(name, _text(", ".join(f"{c['label']} {c['score']:.2f}" for c in row["top_k"])))
        else:
            table.add_row(name, _text(f"error: {row['error']}", "red"))
    console.print(table)


@weights_app.command("fetch")
def weights_fetch(
    depth: int = typer.Argument(50, help="ResNet depth with published weights: 50, 101 or 152."),
    no_top: bool = typer.Option(False, "--no-top", help="The file without the classifier (features only)."),
) -> None:
    """Download Keras's ImageNet weights into this node's cache (md5-checked)."""
    from pipeline.model.weights import WeightsError, imagenet_file

    try:
        path = imagenet_file(_architecture(depth), include_top=not no_top, allow_download=True)
    except WeightsError as error:
        raise _fail(str(error)) from None
    _say(f"ImageNet weights for ResNet-{depth}: {path}")


@weights_app.command("where")
def weights_where() -> None:
    """Where weights are cached on this node (set RESNET_PIPELINE_CACHE to move it)."""
    from pipeline.model.weights import weights_cache_dir

    _say(Path(weights_cache_dir()))


# --- Ray clusters: submit, status, logs, stop (pipeline.cluster); manifests (pipeline.render) -----------------------

ClusterAddressOption = typer.Option(
    None, "--address", envvar="RAY_ADDRESS", help="The cluster's dashboard, e.g. http://127.0.0.1:8265."
)
TokenFileOption = typer.Option(
    None,
    "--token-file",
    help="File holding the cluster's token; default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token.",
)


class _ClusterErrors:
    """Cluster, render and spec errors in one line: exit code 2 for bad input, 1 for failures."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: object) -> bool:
        from pipeline.cluster import ClusterError, ClusterInputError
        from pipeline.render import RenderError
        from pipeline.spec import SpecError

        if isinstance(error, ClusterInputError | RenderError | SpecError):
            raise _fail(str(error)) from None
        if isinstance(error, ClusterError):
            raise _fail(str(error), code=1) from None
        return False


@app.command()
def submit(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="Job spec (YAML)."),
    overrides: list[str] = SetOption,
    address: str | None = ClusterAddressOption,
    token_file: Path | None = TokenFileOption,
    wait: bool = typer.Option(False, "--wait", help="Follow the job's logs until it ends; exit 1 unless it succeeds."),
    scheduled_for: str | None = typer.Option(
        None,
        "--scheduled-for",
        metavar="DATE",
        help="A scheduled run's date (YYYY-MM-DD): its submission id is NAME-DATE, so that night runs once.",
    ),
    submission_id: str | None = typer.Option(None, "--submission-id", help="An explicit submission id."),
    ship_code: bool = typer.Option(
        True, "--ship-code/--no-ship-code", help="Send this pipeline package with the job, or use the image's."
    ),
    driver_cpus: float = typer.Option(0, "--driver-cpus", min=0, help="CPUs reserved for the driver on the head."),
    send_credentials: bool = typer.Option(
        False,
        "--send-credentials",
        help="Send the spec's storage credentials in the job's runtime_env, which Ray writes to the head's logs "
        "(runtime_env_agent.log). Default: refuse; use the cluster's identity or the storage Secret.",
    ),
) -> None:
    """Submit a labeling job to a Ray cluster (Ray Jobs API); prints its submission id."""
    from datetime import date

    from pipeline.cluster import AlreadySubmitted, Cluster, check_credentials, check_name, scheduled_submission_id
    from pipeline.spec import load_spec

    if scheduled_for and submission_id:
        raise _fail("--scheduled-for and --submission-id exclude each other")
    metadata = {}
    with _ClusterErrors():
        spec = load_spec(spec_path, overrides)
        if scheduled_for:
            try:
                day = date.fromisoformat(scheduled_for)
            except ValueError:
                raise _fail(f"--scheduled-for expects a date like 2026-11-29, got {scheduled_for!r}") from None
            submission_id = scheduled_submission_id(spec.name, day)
            metadata["scheduled_for"] = day.isoformat()
        elif submission_id:
            check_name(submission_id)
        check_credentials(spec, send_credentials)  # before any request: a refused spec never reaches the cluster
        cluster = Cluster.connect(address, token_file)
        try:
            job_id = cluster.submit(
                spec,
                submission_id=submission_id,
                ship_code=ship_code,
                driver_cpus=driver_cpus,
                metadata=metadata,
                send_credentials=send_credentials,
            )
            _say(f"submitted: {job_id}")
        except AlreadySubmitted as already:
            _say(already)
            job_id = already.submission_id
            if not wait or already.status in ("SUCCEEDED", "FAILED", "STOPPED"):
                raise typer.Exit(1 if already.status in ("FAILED", "STOPPED") else 0) from None
        if not wait:
            _say(f"follow it with: resnet-pipeline logs {job_id} --follow")
            return
        status = cluster.follow(job_id, lambda chunk: typer.echo(chunk, nl=False))
    _say(f"job {job_id}: {status}")
    if status != "SUCCEEDED":
        raise typer.Exit(1)


JobArgument = typer.Argument(..., metavar="JOB", help="Submission id.")


@app.command("status")
def status_command(
    job_id: str = JobArgument,
    address: str | None = ClusterAddressOption,
    token_file: Path | None = TokenFileOption,
) -> None:
    """A submitted job's status, message and timing."""
    from pipeline.cluster import Cluster, describe

    with _ClusterErrors():
        details = Cluster.connect(address, token_file).status(job_id)
    _say("\n".join(describe(details)))


@app.command("logs")
def logs_command(
    job_id: str = JobArgument,
    address: str | None = ClusterAddressOption,
    token_file: Path | None = TokenFileOption,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends."),
) -> None:
    """A submitted job's logs (its driver's output)."""
    from pipeline.cluster import Cluster

    with _ClusterErrors():
        cluster = Cluster.connect(address, token_file)
        if follow:
            cluster.follow(job_id, lambda chunk: typer.echo(chunk, nl=False))
        else:
            typer.echo(cluster.logs(job_id), nl=False)


@app.command("stop")
def stop_command(
    job_id: str = JobArgument,
    address: str | None = ClusterAddressOption,
    token_file: Path | None = TokenFileOption,
) -> None:
    """Stop a submitted job."""
    from pipeline.cluster import Cluster

    with _ClusterErrors():
        cluster = Cluster.connect(address, token_file)
        if cluster.stop(job_id):
            _say(f"stop requested: {job_id}")
        else:
            _say(f"{job_id} had already ended ({cluster.status(job_id).status})")


@app.command("render")
def render_command(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="Job spec (YAML)."),
    target: str = typer.Option(..., "--target", help="rayjob | raycronjob | cronjob | raycluster | launcher"),
    overrides: list[str] = SetOption,
    cluster_file: Path | None = typer.Option(
        None, "--cluster", help="Cluster settings (YAML): images, sizes, GPU nodes, schedule; see infra/cluster.yaml."
    ),
    cluster_overrides: list[str] = typer.Option(
        [], "--cluster-set", help="Override a cluster setting: --cluster-set gpu_workers.max_replicas=8 (repeatable)."
    ),
    schedule: str | None = typer.Option(None, "--schedule", help="Cron expression of the nightly run: '0 2 * * *'."),
    time_zone: str | None = typer.Option(None, "--time-zone", help="Time zone of --schedule: Europe/Berlin."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write here; default: standard output."),
) -> None:
    """Kubernetes (KubeRay) or Ray cluster-launcher manifests for a job spec; credentials are never written."""
    import shlex

    from pipeline.credentials import redact_assignment
    from pipeline.render import load_cluster, render
    from pipeline.spec import load_spec

    # the command goes into the file: no credential values in it
    words = ["resnet-pipeline", "render", str(spec_path), "--target", target]
    words += [w for o in overrides for w in ("--set", redact_assignment(o))]
    words += ["--cluster", str(cluster_file)] if cluster_file else []
    words += [w for o in cluster_overrides for w in ("--cluster-set", redact_assignment(o))]
    words += ["--schedule", schedule] if schedule else []
    words += ["--time-zone", time_zone] if time_zone else []
    settings = list(cluster_overrides)
    settings += [f"schedule.cron={schedule}"] if schedule else []
    settings += [f"schedule.time_zone={time_zone}"] if time_zone else []
    with _ClusterErrors():
        spec = load_spec(spec_path, overrides)
        rendered = render(spec, target, load_cluster(cluster_file, settings), shlex.join(words))
    if rendered.left_out:
        _say(
            f"Left out of the manifests (credentials): {', '.join(rendered.left_out)}. The pods get credentials "
            "from the storage Secret or the cloud's workload identity (infra/README.md).",
            "yellow",
            to=errors,
        )
    if output is None:
        typer.echo(rendered.text, nl=False)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(rendered.text, encoding="utf-8")
        _say(f"wrote {output}")


def main() -> None:
    app()
