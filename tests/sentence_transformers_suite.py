"""Runs sentence-transformers' own Pooling tests with its Pooling class swapped for fused_pool's.

    python tests/sentence_transformers_suite.py /tmp/st_snapshot

/tmp/st_snapshot is a checkout (or `git archive ... tests`) of the huggingface/sentence-transformers
repository; nothing of it is copied here. The file (tests/sentence_transformer/modules/test_pooling.py
unless --test-file says otherwise) runs three times, each in its own pytest process:

- stock:   sentence-transformers' Pooling, as installed;
- bare:    fused_pool.nn.Pooling, the public class;
- patched: fused_pool.integrations.sentence_transformers.FusedPooling, the class patch() installs.

The swap replaces the `Pooling` attribute of sentence-transformers' pooling module and of its modules
package, so the test file and the model loader (which resolves modules.json's class references by
those names) both get fused_pool's class; the library's own code keeps its `isinstance` checks against
the stock class, as it does for a user. Runs offline: the tiny Hub model the tests load
(sentence-transformers-testing/stsb-bert-tiny-safetensors) is replaced by a stand-in of the same shape
(BERT, mean pooling) built here with random weights and put into a fresh Hugging Face cache.

Exits 0 when every test that passes with the stock class passes with both of fused_pool's classes,
and prints the counts of each run. This file is also the pytest plugin that performs the swap
(`-p sentence_transformers_suite`, with FUSED_POOL_ST_POOLING=bare or patched).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree

TEST_FILE = "tests/sentence_transformer/modules/test_pooling.py"
TINY_MODEL_ID = "sentence-transformers-testing/stsb-bert-tiny-safetensors"
POOLING_MODULE = "sentence_transformers.sentence_transformer.modules.pooling"
CLASSES = ("stock", "bare", "patched")
_SWAP_VARIABLE = "FUSED_POOL_ST_POOLING"
_FAKE_REVISION = "0" * 40


# --- the pytest plugin ------------------------------------------------------------------------------


def pytest_configure(config) -> None:
    which = os.environ.get(_SWAP_VARIABLE, "stock")
    if which == "stock":
        return
    if which not in CLASSES:
        raise ValueError(f"{_SWAP_VARIABLE} must be one of {CLASSES}, not {which!r}")
    # Imported first: it resolves sentence-transformers' own Pooling before the swap hides it.
    import sentence_transformers.sentence_transformer.modules as modules
    import sentence_transformers.sentence_transformer.modules.pooling as pooling_module

    from fused_pool.integrations.sentence_transformers import FusedPooling
    from fused_pool.nn import Pooling

    swapped = Pooling if which == "bare" else FusedPooling
    modules.Pooling = pooling_module.Pooling = swapped
    config.fused_pool_swapped = swapped


def pytest_collection_finish(session) -> None:
    """Checks that the swap reached the test files and the loader's class references."""
    swapped = getattr(session.config, "fused_pool_swapped", None)
    if swapped is None:
        return
    from sentence_transformers.util import import_from_string

    for ref in ("sentence_transformers.models.Pooling", f"{POOLING_MODULE}.Pooling"):
        if import_from_string(ref) is not swapped:
            raise RuntimeError(f"the loader resolves {ref} to {import_from_string(ref)}, not {swapped}")
    for item in session.items:
        module = getattr(item, "module", None)
        if getattr(module, "Pooling", swapped) is not swapped:
            raise RuntimeError(f"{module.__name__} still uses sentence-transformers' Pooling")


# --- the offline stand-in for the tiny Hub model ------------------------------------------------------

_WORDS = "text one two is a bit longer query summarize the following information hello world".split()


def build_tiny_model(hub_cache: str) -> str:
    """A BERT (hidden 32, 2 layers) + mean Pooling SentenceTransformer, saved as TINY_MODEL_ID's
    snapshot in the Hugging Face cache folder hub_cache; returns the snapshot folder."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    repo = os.path.join(hub_cache, "models--" + TINY_MODEL_ID.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", _FAKE_REVISION)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as handle:
        handle.write(_FAKE_REVISION)
    with tempfile.TemporaryDirectory() as backbone:
        letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *":.,?!", *letters]
        vocab += [f"##{c}" for c in letters] + _WORDS
        with open(os.path.join(backbone, "vocab.txt"), "w") as handle:
            handle.write("\n".join(vocab) + "\n")
        BertTokenizerFast(vocab_file=os.path.join(backbone, "vocab.txt")).save_pretrained(backbone)
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        )
        BertModel(config).save_pretrained(backbone)
        transformer = Transformer(backbone)
        model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension())])
        model.save(snapshot)
    return snapshot


# --- the runs ------------------------------------------------------------------------------------------


def run_file(snapshot: str, test_file: str, which: str, hf_home: str, report: str) -> dict[str, str]:
    """Runs test_file of the snapshot with the class `which`; {test id: outcome}."""
    here = os.path.dirname(os.path.abspath(__file__))
    repository = os.path.dirname(here)
    env = dict(
        os.environ,
        HF_HOME=hf_home,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(p for p in (here, repository, os.environ.get("PYTHONPATH")) if p),
        **{_SWAP_VARIABLE: which},
    )
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p"]
    command += ["sentence_transformers_suite", f"--junitxml={report}", "--rootdir", snapshot, test_file]
    completed = subprocess.run(command, cwd=snapshot, env=env, capture_output=True, text=True)
    if not os.path.exists(report):
        raise RuntimeError(f"pytest ({which}) wrote no report:\n{completed.stdout[-3000:]}{completed.stderr}")
    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[test_id] = kinds[0] if kinds else "passed"
    if not outcomes:
        raise RuntimeError(f"pytest ({which}) ran no test:\n{completed.stdout[-3000:]}")
    return outcomes


def summary(outcomes: dict[str, str]) -> str:
    counts = {kind: list(outcomes.values()).count(kind) for kind in ("passed", "failure", "error", "skipped")}
    return ", ".join(f"{count} {kind}" for kind, count in counts.items() if count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("snapshot", help="a huggingface/sentence-transformers checkout")
    parser.add_argument("--test-file", default=TEST_FILE, help="relative to the snapshot")
    parser.add_argument("--classes", nargs="+", default=list(CLASSES), choices=CLASSES)
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.snapshot, args.test_file)):
        parser.error(f"{args.test_file} is not in {args.snapshot}")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import sentence_transformers
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    print(f"sentence-transformers {sentence_transformers.__version__}, {args.test_file}")
    results = {}
    with tempfile.TemporaryDirectory() as work:
        build_tiny_model(os.path.join(work, "hub"))
        for which in args.classes:
            report = os.path.join(work, f"{which}.xml")
            results[which] = run_file(args.snapshot, args.test_file, which, work, report)
            print(f"{which:8s} {summary(results[which])}")
    if "stock" not in results:
        return 0
    passing = {test for test, outcome in results["stock"].items() if outcome == "passed"}
    regressions = {
        which: sorted(test for test in passing if outcomes.get(test) != "passed")
        for which, outcomes in results.items()
        if which != "stock"
    }
    for which, tests in regressions.items():
        for test in tests:
            print(f"{which}: passes with the stock Pooling, not here: {test} ({results[which].get(test)})")
    return 1 if any(regressions.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
