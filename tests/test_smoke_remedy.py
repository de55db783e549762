"""Smoke tier (issue 13): a poisoned release is blocked, remedied, and passes, with the real
`dvc repro` in a repo copy (digits, CPU) and a real sqlite MLflow registry.

A first release whose data carry a blend backdoor (all-to-one -> 0, 10%, alpha 0.1): the data gate
has no history to compare with and lets it through; the release gate blocks it (ASR, and the
inspect stage's poison_suspects).
1. `remedy=finetune` (fine-pruning on a 10% reserve of rows trusted in conf) repairs the model (the
   ASR checks pass) but the training view still holds the rows inspect flags: poison_suspects keeps
   blocking, and the remedied version, tagged as such, does not become champion.
2. The inspect stage's own suspects become the quarantine record (a user action after the block);
   `remedy=quarantine` retrains without those rows, passes every check and becomes champion, tagged
   with the blocked version and the record's digest. The raw store never changes.
"""

from __future__ import annotations

import csv
import json
import sys

import pytest

from conftest import make_repo_copy, tree_digest
from test_smoke_release import champion, failed_checks, version_tags

pytestmark = pytest.mark.smoke

BLEND = ("attack=backdoor", "attack.source=null", "attack.target=0", "attack.rate=0.1", "attack.trigger.kind=blend",
         "attack.trigger.pattern=noise", "attack.trigger.alpha=0.1", "validate.on_fail=warn")
# digits ids are digits/<split>/<index>: the rows ending in 0 or 5 (a fifth) are the ones vouched for
TRUSTED = ("remedy.reserve.source=trusted", "remedy.reserve.trusted=['digits/train/*0','digits/train/*5']")


def test_blocked_release_is_remedied_then_passes(tmp_path):
    repo = make_repo_copy(tmp_path)

    # the poisoned first release: blocked, no champion
    repo.compose(*BLEND)
    assert repo.repro(check=False).returncode != 0
    assert {"asr_max", "asr_increase"} <= failed_checks(repo), repo.json("reports/gate.json")
    assert champion(repo) is None

    # 1. fine-pruning repairs the model, but the view still holds the flagged rows: still blocked
    repo.compose(*BLEND, "remedy=finetune", *TRUSTED)
    assert repo.repro(check=False).returncode != 0
    failed = failed_checks(repo)
    assert "poison_suspects" in failed and not {"asr_max", "asr_increase"} & failed, failed
    train = repo.json("reports/train.json")
    assert train["remedy"]["method"] == "fine_prune" and train["remedy"]["reserve_rows"] == round(0.1 * 1347)
    finetuned = str(train["model_version"])
    tags = version_tags(repo, finetuned)
    assert tags["poisongate.remedy.method"] == "fine_prune" and tags["poisongate.verdict"] == "blocked"
    assert champion(repo) is None, "a remedied model that fails a check never becomes champion"

    # 2. inspect's suspects -> the quarantine record -> a view without them
    inspection = repo.json("reports/inspect.json")
    repo.run([sys.executable, "-m", "pipeline.remedy", "quarantine", "--suspects", "reports/suspects.csv",
              "--inspect", "reports/inspect.json", "--view", "data/view", "--out", "data/quarantine.json"])
    record = repo.json("data/quarantine.json")
    with open(repo.root / "data/view/records.csv") as f:
        poisoned = {r["sample_id"] for r in csv.DictReader(f)}
    quarantined = {r["sample_id"] for r in record["rows"]}
    assert quarantined and len(quarantined) <= inspection["train_rows"]
    assert len(poisoned & quarantined) >= 0.9 * len(poisoned), "the detector's flags hold the poison"
    store_before = tree_digest(repo.root / "data/store")

    repo.compose(*BLEND, "remedy=quarantine")
    repo.repro()
    gate = repo.json("reports/gate.json")
    assert gate["passed"] is True and gate["failed"] == []
    view = repo.json("data/view/view.json")
    assert view["n_quarantined"] == len(quarantined)
    train = repo.json("reports/train.json")
    assert train["train_rows"] == 1347 - len(quarantined)
    assert champion(repo) == str(train["model_version"])
    tags = version_tags(repo, str(train["model_version"]))
    assert tags["poisongate.remedy.of"] == finetuned and tags["poisongate.remedy.method"] == "quarantine"
    assert tags["poisongate.remedy.record"] == record["digest"]
    assert tree_digest(repo.root / "data/store") == store_before, "the raw store never changes"
    assert json.loads((repo.root / "data/quarantine.json").read_text())["digest"] == record["digest"]
