"""Benchmark: `data prepare` tokens per second per core against a single-process baseline.

The baseline batch-encodes the same documents with the same tokenizer on one thread and
writes nothing (documents already in memory). `data prepare` runs as a user runs it (the
command, against a Ray instance started once beforehand, so Ray's start is not counted)
with one worker and with two, reading, splitting, tokenizing, writing shards, merging and
writing the manifest. Printed: tokens/s, tokens/s per core, the ratio to the baseline,
the speedup of two workers over one, and the peak memory of the command and its workers.

    python tools/bench/prepare_speed.py [--megabytes 200] [--vocab 16384] [--keep DIR]

Targets (issue 12): per core at least 0.8 of the baseline; two workers at least 1.7x one.
The command's time includes its fixed costs (joining Ray, starting the worker actors, about
3-4 s; merging; the manifest), so small corpora score lower per core than large ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]


def write_corpus(path: Path, megabytes: int) -> list[str]:
    """Python's standard library as jsonl documents, repeated with a distinct first line."""
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = []
    for file in sorted(root.rglob("*.py")):
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip() and "site-packages" not in file.parts:
            sources.append(text)
    docs, size, copy = [], 0, 0
    with open(path, "w") as f:
        while size < megabytes * 1e6:
            for text in sources:
                doc = f"# copy {copy}\n{text}"
                line = json.dumps({"text": doc}) + "\n"
                f.write(line)
                docs.append(doc)
                size += len(line.encode())
                if size >= megabytes * 1e6:
                    break
            copy += 1
    return docs


def baseline(tokenizer_path: str, docs: list[str]) -> tuple[float, int]:
    """Seconds and tokens of one thread batch-encoding every document, writing nothing."""
    from sparsity_scaling.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    started, tokens = time.perf_counter(), 0
    for i in range(0, len(docs), 1024):
        tokens += sum(len(ids) + 1 for ids in tok.encode(docs[i : i + 1024], threads=1))
    return time.perf_counter() - started, tokens


class PeakMemory:
    """Peak unique memory (USS: pages no other process shares, so not Ray's shared object
    store) of a process and, separately, of the largest of Ray's tokenizing workers."""

    def __init__(self, pid: int):
        self.process, self.driver, self.workers = psutil.Process(pid), 0, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self):
        while not self.stop.is_set():
            try:
                self.driver = max(self.driver, self.process.memory_full_info().uss)
            except psutil.Error:
                pass
            workers = 0
            for proc in psutil.process_iter(["cmdline"]):
                try:
                    if "MapWorker" in " ".join(proc.info["cmdline"] or []):
                        workers = max(workers, proc.memory_full_info().uss)
                except psutil.Error:
                    pass
            self.workers = max(self.workers, workers)
            time.sleep(0.2)

    def close(self):
        self.stop.set()
        self.thread.join()


def prepare(corpus: Path, out: Path, tokenizer: str, workers: int, address: str) -> tuple[float, dict, PeakMemory]:
    command = [sys.executable, "-m", "sparsity_scaling.cli", "data", "prepare", str(corpus), "--out", str(out),
               "--tokenizer", tokenizer, "--workers", str(workers), "--address", address]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    memory = PeakMemory(process.pid)
    output = process.communicate()[0]
    seconds = time.perf_counter() - started
    memory.close()
    if process.returncode:
        sys.exit(f"data prepare failed:\n{output[-3000:]}")
    print("   ", "\n    ".join(line for line in output.splitlines() if line.startswith("data prepare")))
    return seconds, json.loads(Path(f"{out}.json").read_text()), memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--keep", help="work in this directory (kept) instead of a temporary one")
    args = parser.parse_args()
    from sparsity_scaling.data.tokenizer import train_sentencepiece
    from sparsity_scaling.parallel import free_port

    work = Path(args.keep or tempfile.mkdtemp(prefix="prepare-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    print(f"writing {args.megabytes} MB of jsonl to {corpus}", flush=True)
    docs = write_corpus(corpus, args.megabytes)
    tokenizer = work / "tok"
    if not Path(f"{tokenizer}.model").is_file():
        print(f"training a sentencepiece BPE of {args.vocab} tokens on 20 MB", flush=True)
        sample, size = [], 0
        for doc in docs:
            sample.append(doc)
            size += len(doc)
            if size > 20e6:
                break
        train_sentencepiece(sample, tokenizer, args.vocab, "--vocab")
    tokenizer_path = f"{tokenizer}.model"

    print("baseline: one thread batch-encoding every document, writing nothing", flush=True)
    base_seconds, base_tokens = baseline(tokenizer_path, docs)
    base_rate = base_tokens / base_seconds
    del docs
    print(f"    {base_tokens:,} tokens in {base_seconds:.1f} s: {base_rate:,.0f} tokens/s", flush=True)

    port = free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        rates = {}
        for workers in (1, 2):
            out = work / f"prepared_w{workers}"
            for stale in work.glob(f"prepared_w{workers}*"):
                subprocess.run(["rm", "-rf", str(stale)], check=True)
            print(f"data prepare with {workers} worker(s):", flush=True)
            seconds, manifest, memory = prepare(corpus, out, tokenizer_path, workers, f"127.0.0.1:{port}")
            tokens = sum(s["tokens"] for s in manifest["splits"].values())
            assert tokens == base_tokens, (tokens, base_tokens)
            rates[workers] = tokens / seconds
            print(f"    {tokens:,} tokens in {seconds:.1f} s (command start to manifest): {rates[workers]:,.0f} tokens/s,"
                  f" {rates[workers] / workers:,.0f} per core = {rates[workers] / workers / base_rate:.2f}x the "
                  f"baseline per core; peak memory: command {memory.driver / 1e6:.0f} MB, "
                  f"one worker {memory.workers / 1e6:.0f} MB (corpus {args.megabytes} MB)", flush=True)
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True)
    print(f"summary: per core {rates[1] / base_rate:.2f}x (1 worker) and {rates[2] / 2 / base_rate:.2f}x (2 workers) "
          f"of the baseline (target >= 0.8); 2 workers {rates[2] / rates[1]:.2f}x 1 worker (target >= 1.7)")


if __name__ == "__main__":
    main()
