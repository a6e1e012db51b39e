import pytest

from bad_inputs import rows, run
from conftest import micro_model



@pytest.fixture(scope="module")
def table(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    model = micro_model(image_size=8)
    model.save(tmp / "g.safetensors")
    return rows(str(tmp / "g.safetensors"), model, str(tmp))


def _names():
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        model = micro_model(image_size=8)
        model.save(f"{tmp}/g.safetensors")
        return [row[0] for row in rows(f"{tmp}/g.safetensors", model, tmp)]


NAMES = _names()


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_row(table, name):
    row = next(r for r in table if r[0] == name)
    ok, text = run(row)
    assert ok, f"{name}: {text}"


def test_row_names_are_unique():
    assert len(NAMES) == len(set(NAMES))
