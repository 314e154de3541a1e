"""The Colab sampling notebook (notebooks/colab_sampling.ipynb): committed without outputs, and runs end to
end in its smoke mode (DYDIT_NOTEBOOK_SMOKE=1: a tiny random DyDiT and VAE built inside the notebook,
4 steps, CPU), writing its grid, width heatmap and summary where DYDIT_NOTEBOOK_OUT points."""
import json
import sys
from pathlib import Path

import nbformat
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab_sampling.ipynb"

# What the notebook's smoke mode samples: classes 0..3, 2 per class (grid rows x columns), 8x8 latents
# decoded by the tiny VAE (x2) into 16 px images; save_grid pads 2 px around every image.
SMOKE_ROWS, SMOKE_COLS, SMOKE_PX, PAD = 4, 2, 16, 2


def test_notebook_is_committed_clean():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert code, "the notebook has no code cells"
  dirty = [cell.get("id") for cell in code if cell.outputs or cell.execution_count is not None]
  assert not dirty, f"cells committed with outputs or execution counts: {dirty} (clear them before committing)"
  assert "google.colab" in code[0].source, "the first cell installs the project, guarded to run on Colab only"


@pytest.mark.slow
def test_notebook_runs_in_smoke_mode(tmp_path, monkeypatch):
  from ipykernel.kernelspec import install
  from nbclient import NotebookClient

  # A python3 kernelspec of this very interpreter, found first (JUPYTER_PATH precedes every other
  # kernelspec directory): the kernel imports the dydit_jax and jax under test, whatever is installed
  # elsewhere on the machine.
  install(prefix=str(tmp_path / "jupyter"), kernel_name="python3")
  spec = json.loads((tmp_path / "jupyter/share/jupyter/kernels/python3/kernel.json").read_text())
  assert spec["argv"][0] == sys.executable
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
  monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("DYDIT_NOTEBOOK_SMOKE", "1")
  out = tmp_path / "out"
  monkeypatch.setenv("DYDIT_NOTEBOOK_OUT", str(out))

  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
  client.execute()   # raises CellExecutionError (with the cell and its traceback) if any cell fails

  errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
  assert not errors, errors

  grid = Image.open(out / "grid.png")
  assert grid.size == (SMOKE_COLS * (SMOKE_PX + PAD) + PAD, SMOKE_ROWS * (SMOKE_PX + PAD) + PAD)
  assert grid.mode == "RGB"
  assert (out / "widths.png").stat().st_size > 0

  summary = json.loads((out / "summary.json").read_text())
  assert summary["dynamic"] and summary["image_size"] == SMOKE_PX
  assert summary["options"]["engine"] == "buckets"
  engines = summary["engines"]
  assert set(engines) == {"masked", "buckets"}
  for stats in engines.values():
    assert stats["s_per_batch"] > 0
  # Both paths run the same routers on the same batch: the same measured block-MACs ratio, below 1.
  assert 0 < engines["buckets"]["flops_ratio"] < 1
  assert engines["masked"]["flops_ratio"] == pytest.approx(engines["buckets"]["flops_ratio"], abs=1e-6)
