"""`flnode model export` and `flnode model evaluate`: the committed global model of a height, taken home."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .errors import fail, user_errors

HomeOpt = Annotated[Path, typer.Option("--home", help="Node home directory.")]
HeightOpt = Annotated[int | None, typer.Option("--height", help="The height whose model (default: the tip).")]

model_app = typer.Typer(help="The committed global model: export it, score it.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")


@model_app.command("export")
@user_errors
def export(
    home: HomeOpt,
    out: Annotated[Path, typer.Option("--out", help="The file: .npz, .safetensors or .pt (PyTorch state_dict).")],
    height: HeightOpt = None,
) -> None:
    """Write the global model of a height as a file, after checking its hash against the chain."""
    from flnode.node.export import ExportError, committed_model, write_model

    try:
        m = committed_model(home, height)
        write_model(m.tensors, out)
    except ExportError as exc:
        fail(str(exc))
    n = sum(int(v.size) for v in m.tensors.values())
    typer.echo(f"height {m.height}: model {m.model_hash.hex()} (checked against the chain), "
               f"{len(m.tensors)} tensors, {n} parameters -> {out}")


@model_app.command("evaluate")
@user_errors
def evaluate(
    home: HomeOpt,
    height: HeightOpt = None,
    model: Annotated[Path | None, typer.Option("--model", help="An exported model file instead of the chain's.")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="An .npz with x and y (default: the task's test split).")] = None,
) -> None:
    """Accuracy and loss of the model of a height (or of an exported file) on a data set."""
    from flnode.node.export import ExportError, committed_model, evaluate_model, open_home, read_model

    try:
        genesis, _ = open_home(home)
        if model is not None:
            if height is not None:
                fail("--model and --height exclude each other")
            tensors, what = read_model(model), str(model)
        else:
            m = committed_model(home, height)
            tensors, what = dict(m.tensors), f"height {m.height} ({m.model_hash.hex()[:16]})"
        scores = evaluate_model(genesis, tensors, data)
    except ExportError as exc:
        fail(str(exc))
    typer.echo(f"{what} on {data or 'the test split'}: accuracy {scores['accuracy']:.4f}, loss {scores['loss']:.4f}")
