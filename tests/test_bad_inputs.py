import pytest

from bad_inputs import rows, run
from conftest import micro_model



@pytest.fixture(scope="module")
def table(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    model = micro_model(image_size=8)
    model.save(tmp / "g.safetensors")
    return rows(str(tmp / "g.safetensors"), model, str(tmp))


@pytest.mark.parametrize("i", range(30))
def test_bad_input_row(table, i):
    assert len(table) == 30
    ok, text = run(table[i])
    assert ok, f"{table[i][0]}: {text}"
