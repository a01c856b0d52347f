"""Command line interface: ``peft-orthomerge`` (also ``python -m peft_orthomerge``).

Commands: ``merge RECIPE.yaml`` (``--dry-run``: every header-level check and the plan, see
`recipe.preview`), ``inspect PATH_OR_ID...``, ``report OUTPUT_DIR``, ``methods`` (the merge methods
of the registry and their parameters), ``new KIND`` (a commented recipe template), ``demo``.
Transformers' and PEFT's progress bars and warnings are off while a command runs unless
``merge --verbose`` (`progress.library_output_quiet`, restored on exit).
Every error exits with code 2 and one line on stderr (``error: ...``); ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import json
import os
import sys

import click

from .errors import ConfigError, OrthoMergeError
from .progress import library_output_quiet


class _Group(click.Group):
    """A click group whose errors are one line on stderr and exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            self._main(args, prog_name, complete_var, **extra)
        except SystemExit as exc:
            _leave_process_group(exc.code)
            raise

    def _main(self, args, prog_name, complete_var, **extra) -> None:
        argv = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in argv[: argv.index("--") if "--" in argv else len(argv)]
        try:
            super().main(args=argv, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
            sys.exit(0)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            _fail(f"{exc.format_message()}{hint}")
        except click.Abort as exc:  # click turns Ctrl-C into Abort (standalone_mode=False)
            if debug:
                raise
            interrupted = isinstance(exc.__context__, KeyboardInterrupt)
            _fail("interrupted; nothing was written" if interrupted else "aborted", code=130)
        except click.ClickException as exc:
            _fail(exc.format_message())
        except OrthoMergeError as exc:
            if debug:
                raise
            _fail(str(exc), agreed=hasattr(exc, "rank"))
        except KeyboardInterrupt:
            if debug:
                raise
            _fail("interrupted; nothing was written", code=130)
        except Exception as exc:  # an unexpected bug: still one line, traceback with --debug
            if debug:
                raise
            text = " ".join(str(exc).split())
            _fail(
                f"unexpected {type(exc).__name__}: {text} (rerun with --debug for the traceback)",
                agreed=hasattr(exc, "rank"),
            )
        sys.exit(0)


def _leave_process_group(code: int | str | None) -> None:
    """Under a launcher: destroy the process group and exit at once (see `parallel.leave_process_group`)."""
    if "torch.distributed" in sys.modules:
        from .sinks.parallel import leave_process_group

        leave_process_group(code)


def _is_main_process() -> bool:
    """False on ranks other than 0 of a torchrun / ``accelerate launch`` run (they stay silent)."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def _fail(message: str, code: int = 2, *, agreed: bool = False) -> None:
    """Print one error line and exit; ranks other than 0 skip errors that rank 0 also reports (``agreed``)."""
    if _is_main_process():
        click.echo(f"error: {' '.join(message.split())}", err=True)
    elif not agreed:
        click.echo(f"error: [rank {os.environ.get('RANK')}] {' '.join(message.split())}", err=True)
    sys.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="peft-orthomerge", prog_name="peft-orthomerge")
def main(debug: bool) -> None:
    """Merge OFT adapters, LoRA adapters and full fine-tunes on the orthogonal group."""


class _MergeCommand(click.Command):
    """``merge``: its help lists the registry's methods (read when the help is shown)."""

    def format_help_text(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from .ops.registry import method_names

        self.help = (self.help or "").replace("{methods}", ", ".join(method_names()))
        super().format_help_text(ctx, formatter)


@main.command(cls=_MergeCommand)
@click.argument("recipe", metavar="RECIPE.yaml")
@click.option("--out", "out", metavar="DIR", help="Output directory (overrides output.path of the recipe).")
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda", "auto"]),
    default="cpu",
    show_default=True,
    help="Where the math runs.",
)
@click.option(
    "--dry-run", is_flag=True, help="Validate the recipe, check inputs and output, print the plan; write nothing."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--push-to-hub", "push_repo", metavar="REPO_ID", help="Upload the finished output to this Hub repo.")
@click.option("--private", is_flag=True, help="Create the Hub repo as private (with --push-to-hub).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars; print only the output path.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: the plan as JSON.")
@click.option("--verbose", "-v", is_flag=True, help="Keep transformers' and PEFT's progress bars and warnings.")
def merge(
    recipe: str,
    out: str | None,
    device: str,
    dry_run: bool,
    overwrite: bool,
    push_repo: str | None,
    private: bool,
    quiet: bool,
    as_json: bool,
    verbose: bool,
) -> None:
    """Run the merge described by RECIPE.yaml.

    \b
    Kinds (the recipe's `kind:`): oft (OFT adapters), lora (LoRA adapters), full (full fine-tunes),
    mixed (full fine-tunes, LoRA and OFT adapters of one base).
    Methods: {methods}.
    Recipe reference: README.md, section "Recipe reference"; examples in examples/recipes/;
    a commented template of each kind: `peft-orthomerge new oft|lora|full|mixed`.

    The method names a recipe accepts (method.name, method.residual) and the parameters of each
    (method.residual_kwargs) are listed by ``peft-orthomerge methods``. `--dry-run` checks the
    inputs against the recipe's kind and the base (headers only) and prints what will happen.

    Several processes (one node or many) split a full-model merge between them when started by
    a launcher: ``torchrun --nproc_per_node N -m peft_orthomerge merge RECIPE.yaml`` or
    ``accelerate launch --num_processes N -m peft_orthomerge merge RECIPE.yaml``. Only rank 0
    prints and pushes.
    """
    from .recipe import load_recipe, run_recipe
    from .sources.resolve import looks_like_repo_id

    if private and not push_repo:
        raise click.UsageError("--private only applies with --push-to-hub")
    if push_repo and not looks_like_repo_id(push_repo):
        raise ConfigError(f"invalid Hub repo id {push_repo!r} for --push-to-hub; expected 'namespace/name'")
    if as_json and not dry_run:
        raise click.UsageError("--json only applies with --dry-run")
    parsed = load_recipe(recipe)
    main_process = _is_main_process()
    with library_output_quiet(not verbose):
        result = run_recipe(
            parsed, out, overwrite=overwrite, device=device, dry_run=dry_run, quiet=quiet or not main_process
        )
        if dry_run and main_process:
            _print_dry_run(result, push_repo, private, as_json)
    if not main_process or dry_run:
        return
    click.echo(result.output_path if quiet else str(result))
    if push_repo:
        from .hub import push_to_hub

        url = push_to_hub(result.output_path, push_repo, private=private)
        click.echo(f"pushed to {url}")


def _print_dry_run(plan, push_repo: str | None, private: bool, as_json: bool) -> None:
    """The deep checks of a dry run (`recipe.preview.preview_plan`) and their summary, as text or JSON."""
    from .recipe.preview import format_preview, preview_plan

    summary = preview_plan(plan)
    if push_repo:
        summary["notes"].append(f"then push_to_hub({str(plan.output_dir)!r}, {push_repo!r}, private={private})")
    if as_json:
        click.echo(json.dumps(summary, indent=2, allow_nan=False))
        return
    click.echo(format_preview(summary))
    click.echo("nothing was written")


@main.command()
@click.argument("sources", nargs=-1, required=True, metavar="PATH_OR_ID...")
@click.option("--base", metavar="PATH_OR_ID", help="Base model, for task vectors of full checkpoints.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(sources: tuple[str, ...], base: str | None, as_json: bool) -> None:
    """Describe adapters or checkpoints and, for several, how they relate."""
    from .inspection import format_inspection, inspect_sources

    with library_output_quiet():
        result = inspect_sources(list(sources), base=base)
    click.echo(json.dumps(result, indent=2, allow_nan=False) if as_json else format_inspection(result))
    if "not_related" in result:  # every input was described; the set cannot be compared
        raise click.ClickException(result["not_related"])


@main.command()
@click.argument("output_dir", metavar="OUTPUT_DIR")
@click.option("--to", "to", metavar="DIR", help="Where to write report.json and plots [OUTPUT_DIR/diagnostics].")
@click.option("--no-plots", is_flag=True, help="Only report.json (no matplotlib needed).")
@click.option("--overwrite", is_flag=True, help="Replace an existing diagnostics directory.")
def report(output_dir: str, to: str | None, no_plots: bool, overwrite: bool) -> None:
    """Diagnostics of a finished merge: report.json and PNG plots."""
    from .diagnostics import format_summary, write_diagnostics

    with library_output_quiet():
        written, data = write_diagnostics(output_dir, out=to, plots=not no_plots, overwrite=overwrite)
    click.echo(format_summary(data))
    if no_plots:
        click.echo("  plots: none (--no-plots)")
    click.echo("written:")
    for path in written:
        click.echo(f"  {path}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def methods(as_json: bool) -> None:
    """List the merge methods (OFT method.name, residual) and the parameters each one declares."""
    from .ops.registry import get_method, method_names

    specs = [get_method(name) for name in method_names()]
    if as_json:
        rows = [
            {
                "name": m.name,
                "family": m.family,
                "orthogonal": m.orthogonal,
                "linear": m.linear,
                "params": [{"name": p.name, "type": p.type_text, "default": repr(p.default)} for p in m.params],
            }
            for m in specs
        ]
        click.echo(json.dumps(rows, indent=2))
        return
    for m in specs:
        traits = [m.family, "orthogonal" if m.orthogonal else "not orthogonal"] + ["streams"] * m.linear
        params = ", ".join(str(p) for p in m.params) or "no parameters"
        click.echo(f"{m.name:<12} {', '.join(traits):<36} {params}")


@main.command()
@click.argument("kind", type=click.Choice(["oft", "lora", "full", "mixed"]))
def new(kind: str) -> None:
    """Print a commented recipe template of KIND (valid as printed; edit the paths)."""
    from .recipe.templates import recipe_template

    click.echo(recipe_template(kind), nl=False)


@main.command()
@click.option("--keep", metavar="DIR", help="Keep the demo's inputs and output in DIR (new or empty).")
def demo(keep: str | None) -> None:
    """Build a tiny model and three OFT adapters locally, merge them, reload and compare."""
    from .demo import run_demo

    with library_output_quiet():
        run_demo(keep)
