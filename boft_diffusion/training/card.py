"""Model cards: a README.md with Hugging Face front matter that describes a trained adapter."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text

__all__ = ["CardParts", "write_model_card"]


@dataclass(frozen=True)
class CardParts:
    """What a recipe says in its model card; :meth:`~boft_diffusion.training.recipe.TrainingRecipe.write_card`
    adds the base model, trainable parameters, the final grid and the metrics."""

    title: str
    description: str
    hyperparameters: tuple[str, ...]
    """Config keys (dotted) the card lists besides every ``boft.*`` key."""
    usage: str
    """Python that loads the adapter and samples."""
    tags: tuple[str, ...]
    instance_prompt: str | None = None


def _front_matter(base_model: str, tags: Sequence[str], prompt: str | None) -> str:
    lines = ["---", f"base_model: {base_model}", "library_name: diffusers", "license: other", "tags:"]
    lines += [f"- {tag}" for tag in tags]
    if prompt:
        lines.append(f"instance_prompt: {prompt!r}")
    return "\n".join([*lines, "---", ""])


def write_model_card(
    output_dir: str | Path,
    *,
    title: str,
    base_model: str,
    description: str,
    hyperparameters: Mapping[str, Any],
    trainable_parameters: int,
    usage: str,
    images: Sequence[str] = (),
    tags: Sequence[str] = ("boft", "diffusers", "text-to-image"),
    instance_prompt: str | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``<output_dir>/README.md``; ``images`` are paths relative to ``output_dir``.

    ``metrics``: metrics.json's content (``before`` / ``after`` dicts, ``scorer``), shown as a table.
    """
    rows = "\n".join(f"| `{key}` | `{value}` |" for key, value in hyperparameters.items())
    pictures = "\n".join(f"![{Path(p).stem}]({p})" for p in images)
    text = f"""{_front_matter(base_model, tags, instance_prompt)}
# {title}

{description}

- Base model: `{base_model}`
- Trainable parameters: {trainable_parameters:,d}
- Adapter file: `boft_weights.safetensors`

## Samples

{pictures or "No validation prompts were configured."}

{_metrics_section(metrics)}## Use it

```python
{usage.strip()}
```

## Training hyperparameters

| key | value |
| --- | --- |
{rows}
"""
    return atomic_write_text(Path(output_dir) / "README.md", text)


def _metrics_section(report: Mapping[str, Any] | None) -> str:
    """ "What it learned": the metrics before and after training, or nothing when the run measured none."""
    if not report:
        return ""
    before, after = report.get("before") or {}, report["after"]

    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}"

    rows = "\n".join(
        f"| {name} | {cell(before.get(name))} | {cell(value)} |" for name, value in after.items()
    )
    return f"""## What it learned

Measured on the base model before training and on the adapter after it (scorer: `{report.get("scorer")}`,
`metrics.json`; samples in `metrics.png`: per prompt, the base's images then the adapter's).

| metric | before | after |
| --- | --- | --- |
{rows}

{_per_prompt_section(report.get("per_prompt"), cell)}"""


def _per_prompt_section(per_prompt: Mapping[str, Any] | None, cell: Callable[[Any], str]) -> str:
    """Each prompt's own values (metrics.json's ``per_prompt``): a row per prompt, a column per metric,
    each cell ``before → after``; blank where the prompt takes no part in the metric."""
    if not per_prompt or not (per_prompt.get("after") or per_prompt.get("before")):
        return ""
    before, after = per_prompt.get("before") or {}, per_prompt.get("after") or {}
    prompts = list(dict.fromkeys([*after, *before]))
    names = list(dict.fromkeys(name for p in prompts for name in (*after.get(p, {}), *before.get(p, {}))))

    def pair(prompt: str, name: str) -> str:
        was, now = before.get(prompt, {}), after.get(prompt, {})
        if name not in was and name not in now:
            return ""
        return f"{cell(was.get(name))} → {cell(now.get(name))}"

    def row(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    rows = [row(["prompt", *names]), row(["---"] * (len(names) + 1))]
    rows += [row([p.replace("|", "\\|"), *(pair(p, n) for n in names)]) for p in prompts]
    table = "\n".join(rows)
    return f"""### Per prompt

Each prompt's own values, before → after.

{table}

"""
