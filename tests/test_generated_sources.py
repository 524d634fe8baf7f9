"""Generated sources match their generator (csrc/cuda/generate_kernels.py): the CUDA
instantiation files are written by it, never by hand."""
import importlib.util
from pathlib import Path

CUDA_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cuda"


def test_cuda_instantiation_files_are_generated():
    spec = importlib.util.spec_from_file_location("generate_kernels", CUDA_DIR / "generate_kernels.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    files = generator.kernel_files()
    head_dims, dtypes = generator.HEAD_DIMS, generator.DTYPES
    assert set(files) == ({f"flash_fwd_hdim{d}.cu" for d in head_dims}
                          | {f"flash_bwd_hdim{d}_{t}.cu" for d in head_dims for t in dtypes})
    for name, text in files.items():
        assert (CUDA_DIR / name).read_text() == text, f"{name} differs from generate_kernels.py's output"
    on_disk = {p.name for p in CUDA_DIR.glob("flash_*_hdim*.cu")}
    assert on_disk == set(files), f"instantiation files not generated: {sorted(on_disk - set(files))}"
