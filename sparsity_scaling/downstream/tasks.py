"""Which lm-eval tasks a downstream evaluation runs, offline.

Tasks come from lm-eval's registry, from task YAML files in `--include-path` directories,
or from the suite's own smoke tasks (`sparsity_smoke`), which are written on first use from
the validation split of the built-in corpus (the Python standard library), so they need no
data at hand. They check that the pipeline works; they are not a benchmark.

Nothing is ever downloaded: Hugging Face datasets and hub run offline, and a task whose data
is not on this machine is refused with one line saying how to provide it.
"""

from __future__ import annotations

import functools
import json
import os
import random
from pathlib import Path

from ..data.corpus import Document, load_documents, prose_paragraphs, split_documents
from ..errors import SettingError, UserError
from ..files import write_text_atomic

SMOKE = "sparsity_smoke"
SMOKE_TASKS = (f"{SMOKE}_prose", f"{SMOKE}_code")
SMOKE_VERSION = 2  # bump when the generated items change
SMOKE_ITEMS = 200  # per task
VAL_FRACTION = 0.05  # the built-in corpus' default validation share (DataConfig.val_fraction)


def go_offline() -> None:
    """Hugging Face hub and datasets never reach the network from here on (and draw no
    progress bars: the evaluation prints its own progress lines). lm-eval forks no pool for
    its bootstrap standard errors (DISABLE_MULTIPROC): a fork of a process holding torch's,
    gloo's or CUDA's threads can deadlock in the child, and the evaluation then never ends."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TQDM_DISABLE",
                 "HF_DATASETS_DISABLE_PROGRESS_BARS", "DISABLE_MULTIPROC"):
        os.environ[name] = "1"


# ---------------------------------------------------------------- the smoke tasks


def _prose_items(docs: list[Document], rng: random.Random) -> list[dict]:
    """Prose: 14 words of a paragraph; which of 4 six-word continuations follows (the other
    three end other paragraphs at the same place)."""
    spans = []
    for paragraph in (p for doc in docs for p in prose_paragraphs(doc)):
        words = paragraph.split()
        if len(words) >= 20 and all(w.isprintable() for w in words):
            spans.append((" ".join(words[:14]), " " + " ".join(words[14:20])))
    rng.shuffle(spans)
    return _multiple_choice(spans, rng)


def _code_items(docs: list[Document], rng: random.Random) -> list[dict]:
    """Code: six lines of a standard-library module; which of 4 lines comes next (the other
    three follow other windows)."""
    windows = []
    for doc in docs:
        lines = [line for line in doc.text.splitlines() if line.strip() and line.isprintable()]
        for start in range(0, len(lines) - 7, 25):
            context, target = lines[start:start + 6], lines[start + 6]
            if 8 <= len(target.strip()) <= 60:
                windows.append(("\n".join(context), "\n" + target))
    rng.shuffle(windows)
    return _multiple_choice(windows, rng)


def _multiple_choice(pairs: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    """Items of (context, right continuation); the wrong choices are other items' continuations.
    Continuations carry their own separator (a space, a newline): the tasks' target delimiter is empty."""
    items = []
    for context, answer in pairs[:SMOKE_ITEMS]:
        wrong = rng.sample([c for _, c in pairs if c != answer], 3)
        label = rng.randrange(4)
        items.append({"context": context, "choices": wrong[:label] + [answer] + wrong[label:], "label": label})
    return items


def _smoke_yaml(task: str, data: Path) -> str:
    return (f"task: {task}\ntag: [{SMOKE}]\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
            "test_split: test\noutput_type: multiple_choice\ntarget_delimiter: \"\"\n"
            "doc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: label\nmetric_list:\n"
            "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
            "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
            f"metadata:\n  version: {SMOKE_VERSION}\n")


def smoke_tasks_dir(cache: Path) -> Path:
    """A directory of the smoke tasks' YAML and data, written once per cache and Python."""
    valid = split_documents(load_documents("stdlib"), VAL_FRACTION)
    out = cache / "downstream" / f"{SMOKE}-v{SMOKE_VERSION}-{valid.valid_hash[:12]}"
    if (out / "done").is_file():
        return out
    items = {SMOKE_TASKS[0]: _prose_items(valid.valid, random.Random(0)),
             SMOKE_TASKS[1]: _code_items([d for d in valid.valid if d.kind == "code"], random.Random(1))}
    for task, rows in items.items():
        data = out / f"{task}.jsonl"
        write_text_atomic(data, "".join(json.dumps(row) + "\n" for row in rows))
        write_text_atomic(out / f"{task}.yaml", _smoke_yaml(task, data))
    write_text_atomic(out / "done", "")
    return out


# ---------------------------------------------------------------- resolving task names


def task_manager(include_paths: list[str], cache: Path, tasks: tuple[str, ...] = ()):
    """lm-eval's task index over the smoke tasks and `include_paths`, and over its registry
    too unless they hold every one of `tasks` (indexing the registry takes seconds)."""
    for path in include_paths:
        if not Path(path).is_dir():
            raise SettingError("include_path", path, "not a directory")
    paths = (str(smoke_tasks_dir(cache)), *include_paths)
    local = _index(paths, registry=False)
    if tasks and all(name in local.all_tasks for name in tasks):
        return local
    return _index(paths, registry=True)


@functools.lru_cache(maxsize=4)
def _index(paths: tuple[str, ...], registry: bool):
    """One task index per set of directories in a process (the registry's takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=registry)


def load_task(name: str, manager) -> dict:
    """lm-eval's task dictionary for one task (or group) name, its data read from this
    machine; one line if it cannot be."""
    from lm_eval.tasks import get_task_dict

    if name not in manager.all_tasks:
        raise SettingError("tasks", name, "no such task in lm-eval's registry or the --include-path directories")
    try:
        return get_task_dict([name], manager)
    except Exception as error:  # datasets raises many kinds when data is missing offline
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"--tasks {name}: its data is not on this machine ({first[:200]}); nothing is downloaded here: "
            f"fetch it once into the Hugging Face cache where you have a network (e.g. "
            f"`python -c \"import datasets; datasets.load_dataset(...)\"`), or give a task YAML whose "
            f"dataset points at local files with --include-path DIR") from None
