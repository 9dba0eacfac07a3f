"""Where a math task's questions come from: hub datasets, local files and generated word problems,
read into base.Question(text, gold), and which of them a run trains on and which it reports.

Two kinds of sets, kept apart as the paper's protocol does:
  - training sets (--task): a run draws its training questions from one, and holds a quarter of
    it out (base.split) for the held-out accuracy eval_acc;
  - benchmarks (--eval-tasks): evaluated whole (eval_acc/<task>), and every training question with
    the text of one of theirs (ignoring case and spacing) is removed from the training pool.

    name        dataset (split)                               as --task              as --eval-tasks
    gsm8k       openai/gsm8k, config main                     train (test held out)  test (1,319)
    dapo17k     BytedTsinghua-SIA/DAPO-Math-17k (train)        divided by split       (a training set)
    deepscaler  agentica-org/DeepScaleR-Preview-Dataset        divided by split       (a training set)
    math500     HuggingFaceH4/MATH-500 (test)                  divided by split       whole (500)
    aime24      HuggingFaceH4/aime_2024 (train)                divided by split       whole (30)
    aime25      yentinglin/aime_2025 (train)                   divided by split       whole (30)
    words       generated in code (wordproblems.py)            divided by split       its held-out quarter
    jsonl:PATH  a local file (parquet:PATH too)               divided by split       the whole file

Rows are read by their columns, the same for a hub dataset and for its file downloaded by hand
(what `--task parquet:PATH` reads without network): `question` or `problem` with `answer` (GSM8K
writes its gold after "####"; MATH-500 and DeepScaleR as LaTeX, AIME as an integer), or `prompt`
with `reward_model.ground_truth` (DAPO-Math-17k and verl's parquet files: the problem is the
prompt's first message without DAPO's instruction lines, since each agent's role gives its own
answer format). Questions are deduplicated by text, ignoring case and spacing (DAPO-Math-17k
repeats each of its 17k problems many times).
"""

import json
import os

import hub
from tasks.base import Question, TaskError, split

# name -> (hub path, config, split, the split's role): "train" a training split, "test" a
# benchmark split, "one" a benchmark's only split (divided when it is --task), "pool" a training
# set's only split
HUB = {
    "gsm8k": ("openai/gsm8k", "main", {"train": "train", "test": "test"}),
    "dapo17k": ("BytedTsinghua-SIA/DAPO-Math-17k", None, {"pool": "train"}),
    "deepscaler": ("agentica-org/DeepScaleR-Preview-Dataset", None, {"pool": "train"}),
    "math500": ("HuggingFaceH4/MATH-500", None, {"one": "test"}),
    "aime24": ("HuggingFaceH4/aime_2024", None, {"one": "train"}),
    "aime25": ("yentinglin/aime_2025", None, {"one": "train"}),
}
LOCAL = ("jsonl", "parquet")
# DAPO-Math-17k's prompt: these paragraphs around the problem ask for an "Answer:" line
DAPO_INSTRUCTIONS = ("Solve the following math problem", "Remember to put your answer")


def is_math_task(name: str) -> bool:
    return name in HUB or name == "words" or name.split(":", 1)[0] in LOCAL


def is_benchmark(name: str) -> bool:
    """Whether --eval-tasks can evaluate it: anything but a training set alone."""
    return is_math_task(name) and "pool" not in HUB.get(name, (None, None, {}))[2]


def absolute(spec: str) -> str:
    """A task's local file (jsonl:PATH, parquet:PATH) as an absolute path; any other task as it is."""
    kind, _, path = spec.partition(":")
    return f"{kind}:{os.path.abspath(path)}" if kind in LOCAL else spec


def check_names(names: list, flag: str, extra: tuple = ()):
    """TaskError unless every name is a benchmark (or one of `extra`, such as eval.py's heldout) and
    no two name the same task (files are named by their file name)."""
    for name in names:
        if name not in extra and not is_benchmark(name):
            known = ", ".join(
                [*extra, "words", *(n for n in HUB if is_benchmark(n)), "jsonl:PATH", "parquet:PATH"]
            )
            raise TaskError(f"{flag}: {name!r} is not a benchmark ({known})")
    if len({short_name(n) for n in names}) < len(names):
        raise TaskError(f"{flag} names a task twice (files are named by their file name): {','.join(names)}")


def short_name(spec: str) -> str:
    """A task's name in metrics: the hub name, or a local file's name without its extension."""
    kind, _, path = spec.partition(":")
    return os.path.splitext(os.path.basename(path))[0] if kind in LOCAL else spec


def load_questions(spec: str) -> tuple[list, list]:
    """(training questions, held-out questions) of --task."""
    if spec == "words":
        return split(words())
    if spec in HUB:
        splits = HUB[spec][2]
        if "train" in splits:
            return hub_split(spec, splits["train"]), hub_split(spec, splits["test"])
        return split(hub_split(spec, splits.get("one") or splits["pool"]))
    return split(local_file(spec))


def benchmark(spec: str) -> list:
    """The whole benchmark set of an --eval-tasks name."""
    if spec == "words":
        return split(words())[1]
    if spec in HUB:
        splits = HUB[spec][2]
        return hub_split(spec, splits.get("test") or splits["one"])
    return local_file(spec)


def without(pool: list, benchmarks) -> list:
    """The training pool without any question of the benchmarks (compared by text, ignoring case
    and spacing)."""
    seen = {key(q.text) for qs in benchmarks for q in qs}
    return [q for q in pool if key(q.text) not in seen]


def key(text: str) -> str:
    return " ".join(text.split()).lower()


def words() -> list:
    from tasks import wordproblems

    return [Question(text, answer) for text, answer in wordproblems.generate(4000, seed=0)]


def hub_split(spec: str, name: str) -> list:
    """One split of a hub dataset, loaded with `datasets` (cached after the first time); without
    network, one line naming the local-file alternative."""
    path, config, _ = HUB[spec]
    offline = (
        f"{spec}: the hub ({path}) cannot be reached; without network, pass a local file: download "
        f"the dataset's files elsewhere and give one as parquet:PATH or jsonl:PATH"
    )
    if not hub.reachable():
        raise TaskError(offline)
    import datasets

    datasets.disable_progress_bars()
    try:
        rows = datasets.load_dataset(path, config, split=name)
    # no network, no cache: one line, and what to do instead
    except Exception as e:
        raise TaskError(f"{offline} ({type(e).__name__})") from None
    return rows_to_questions(rows, spec)


def local_file(spec: str) -> list:
    """The rows of a jsonl: or parquet: file, loaded with `datasets`."""
    kind, path = spec.split(":", 1)
    if not os.path.isfile(path):
        raise TaskError(f"{spec}: no such file {path}")
    if kind == "jsonl":
        check_jsonl(path)
    # imported here: the relay never needs it
    import datasets

    datasets.disable_progress_bars()
    try:
        rows = datasets.load_dataset("json" if kind == "jsonl" else "parquet", data_files=path, split="train")
    except Exception as e:
        raise TaskError(f"{spec}: {path} could not be read as {kind} ({type(e).__name__})") from None
    return rows_to_questions(rows, spec)


def check_jsonl(path: str):
    """Name the first malformed line (datasets' own error does not)."""
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    json.loads(line)
                except ValueError:
                    raise TaskError(f"{path}, line {number}: not valid JSON") from None


def rows_to_questions(rows, spec: str) -> list:
    """Question(text, gold) per row, read by its columns (see the module's doc), without repeats."""
    columns = rows.column_names
    if {"prompt", "reward_model"} <= set(columns):
        rows = rows.select_columns(["prompt", "reward_model"])
        pairs = ((dapo_problem(r["prompt"]), r["reward_model"]["ground_truth"]) for r in rows)
    elif {"question", "answer"} <= set(columns) or {"problem", "answer"} <= set(columns):
        text = "question" if "question" in columns else "problem"
        rows = rows.select_columns([text, "answer"])
        pairs = ((r[text], str(r["answer"]).split("####")[-1].strip()) for r in rows)
    else:
        raise TaskError(
            f"{spec}: needs a 'question' (or 'problem') and an 'answer' field, or 'prompt' and "
            f"'reward_model'; found {columns}"
        )
    unique = {}
    for problem, gold in pairs:
        unique.setdefault(key(str(problem)), Question(str(problem), str(gold)))
    questions = list(unique.values())
    if not questions:
        raise TaskError(f"{spec}: no questions")
    return questions


def dapo_problem(prompt) -> str:
    """The problem of a DAPO-style prompt (chat messages, or a string): its first user message
    without DAPO's instruction paragraphs, the first and the last."""
    users = [m["content"] for m in prompt if m["role"] == "user"] if isinstance(prompt, list) else [prompt]
    paragraphs = str(users[0] if users else "").split("\n\n")
    if paragraphs and paragraphs[0].startswith(DAPO_INSTRUCTIONS[0]):
        paragraphs = paragraphs[1:]
    if paragraphs and paragraphs[-1].startswith(DAPO_INSTRUCTIONS[1]):
        paragraphs = paragraphs[:-1]
    return "\n\n".join(paragraphs).strip()
