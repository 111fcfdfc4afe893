"""One LDB checkpoint-state format for every entry (issue 17, item 4), on real DeepSpeed engines (gloo).

``LDBEngine`` and an engine given LDB by ``ldb_ds.attach`` (the Hugging Face path) both keep the
LDB state in ``ldb_state.pt`` in the checkpoint's tag folder (``ldb_ds.state_file``). Checked:
a checkpoint of either entry resumes in either entry exactly (same masks, bitwise the same
weights); checkpoints in the two formats used before (LDBEngine's client-state entry, the attached
engine's file) still load; a module-only load leaves the LDB state fresh at both entries; and a
universal conversion (``checkpoint_fit.to_universal``) carries the state to another world size,
hashed in the conversion's manifest.
"""

from __future__ import annotations

import pytest

from tests.support import state_file_workers as W
from tests.support.dist import run_distributed


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    return run_distributed(W.formats_and_entries, 2, str(tmp_path_factory.mktemp("formats")), timeout=600)


def test_every_entry_writes_the_state_file_and_no_client_state_entry(formats):
    for r in formats:
        assert r["same_as_ref"], "the attached engine did not train as the LDBEngine: the comparison would be void"
        assert "ldb_state.pt" in r["files"]["state_file"], r["files"]
        assert "layer_drop_back" not in r["model_states_keys"]["state_file"]
        # The old formats as the old code wrote them: one in DeepSpeed's client state, one in the file.
        assert "layer_drop_back" in r["model_states_keys"]["client_state"]
        assert "ldb_state.pt" not in r["files"]["client_state"]
        assert "ldb_state.pt" in r["files"]["attached_file"]


@pytest.mark.parametrize("entry", W.ENTRIES)
@pytest.mark.parametrize("fmt", W.FORMATS)
def test_every_format_resumes_exactly_in_every_entry(formats, fmt, entry):
    for r in formats:
        load = r["loads"][(fmt, entry)]
        assert load["path"] is not None
        assert load["state"] == r["saved_state"], "the LDB state did not come back"
        assert load["masks"] == r["ref_masks"][W.SAVE_AFTER:], "the resumed run drew other masks"
        assert any(load["masks"]), "no drops after the resume: the generator state would go unchecked"
        assert load["final_equal"], "the resumed run's weights differ from the uninterrupted run's"
        if entry == "ldb_engine":  # its load returns the restored state, as ldb-train's resume reads it
            assert "layer_drop_back" in load["client_keys"]
    assert formats[0]["loads"][(fmt, entry)]["masks"] == formats[1]["loads"][(fmt, entry)]["masks"]


@pytest.mark.parametrize("entry", W.ENTRIES)
def test_module_only_load_is_a_warm_start_at_every_entry(formats, entry):
    for r in formats:
        m = r["module_only"][entry]
        assert m["path"] is not None and m["weights"], "the module weights did not load"
        assert m["fresh"], "a module-only load changed the LDB state"


@pytest.mark.slow
def test_universal_conversion_carries_the_ldb_state_to_another_world_size(tmp_path):
    saved = run_distributed(W.save_for_universal, 2, str(tmp_path), timeout=600)[0]
    loaded = run_distributed(W.load_universal, 1, str(tmp_path), timeout=600)[0]
    for (saved_by, entry), r in loaded.items():
        assert r["tag"] == "t_universal" and r["path"] is not None, (saved_by, entry)
        assert "ldb_state.pt" in r["files"], r["files"]  # copied and hashed in the conversion's manifest
        assert r["state"] == saved[saved_by], (saved_by, entry)
        assert r["state"]["steps"] == 2 and r["state"]["epoch"] == 1
