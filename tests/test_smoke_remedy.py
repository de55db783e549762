"""Smoke tier (issue 13): a poisoned release is blocked, remedied, and passes, with the real
`dvc repro` in a repo copy (digits, CPU) and a real sqlite MLflow registry.

1. A first release whose data carry a blend backdoor (all-to-one -> 0, 10%, alpha 0.1): the data
   gate has no history to compare with and lets it through; the release gate blocks it on ASR.
   `remedy=finetune` (fine-pruning on a 10% reserve of rows trusted in conf) remedies the retrained
   model: it passes every check, becomes champion, and names the blocked version.
2. A BadNets patch (class 1 -> 7, 10%) under `validate.on_fail=warn`: blocked (data gate and ASR).
   A suspects file built from the view's own poison records (an oracle detector standing in for the
   inspect stage, issue 12) becomes the quarantine record; `remedy=quarantine` retrains without those
   rows, passes and becomes champion, tagged with the record's digest. The raw store never changes.
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

    # 1. poisoned first release: blocked on ASR, no champion
    repo.compose(*BLEND)
    assert repo.repro(check=False).returncode != 0
    assert {"asr_max", "asr_increase"} <= failed_checks(repo), repo.json("reports/gate.json")
    blocked = repo.json("reports/train.json")["model_version"]
    assert champion(repo) is None

    # ... remedied by fine-pruning on the trusted reserve: every check passes, champion
    repo.compose(*BLEND, "remedy=finetune", *TRUSTED)
    repo.repro()
    gate = repo.json("reports/gate.json")
    assert gate["passed"] is True and gate["failed"] == []
    train = repo.json("reports/train.json")
    assert train["remedy"]["method"] == "fine_prune" and train["remedy"]["reserve_rows"] == round(0.1 * 1347)
    assert champion(repo) == str(train["model_version"]) != str(blocked)
    tags = version_tags(repo, str(train["model_version"]))
    assert tags["poisongate.remedy.of"] == str(blocked) and tags["poisongate.remedy.method"] == "fine_prune"
    assert tags["poisongate.verdict"] == "passed"
    first_champion = champion(repo)

    # 2. BadNets patch 1 -> 7: blocked by the data gate and on ASR; champion unchanged
    repo.compose("attack=backdoor", "validate.on_fail=warn")
    assert repo.repro(check=False).returncode != 0
    assert {"data_validation", "asr_max"} <= failed_checks(repo)
    patched = repo.json("reports/train.json")["model_version"]
    assert champion(repo) == first_champion

    # the oracle detector's suspects -> the quarantine record (a user action after the block)
    with open(repo.root / "data/view/records.csv") as f:
        records = list(csv.DictReader(f))
    lines = ["row_id,sha256,class,oracle,flagged"] + [f"{r['sample_id']},{r['sha256_after']},{r['new_label']},1.0,1"
                                                      for r in records]
    (repo.root / "reports/suspects.csv").write_text("\n".join(lines) + "\n")
    repo.run([sys.executable, "-m", "pipeline.remedy", "quarantine", "--suspects", "reports/suspects.csv",
              "--out", "data/quarantine.json"])
    record = repo.json("data/quarantine.json")
    assert len(record["rows"]) == len(records) > 0
    store_before = tree_digest(repo.root / "data/store")

    repo.compose("attack=backdoor", "validate.on_fail=warn", "remedy=quarantine")
    repo.repro()
    assert repo.json("reports/validation.json")["success"] is True
    assert repo.json("reports/gate.json")["passed"] is True
    view = repo.json("data/view/view.json")
    assert view["n_quarantined"] == len(records)
    train = repo.json("reports/train.json")
    assert train["train_rows"] == 1347 - len(records)
    assert champion(repo) == str(train["model_version"])
    tags = version_tags(repo, str(train["model_version"]))
    assert tags["poisongate.remedy.of"] == str(patched) and tags["poisongate.remedy.method"] == "quarantine"
    assert tags["poisongate.remedy.record"] == record["digest"]
    assert tree_digest(repo.root / "data/store") == store_before, "the raw store never changes"
    assert json.loads((repo.root / "data/quarantine.json").read_text())["digest"] == record["digest"]
