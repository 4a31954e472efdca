"""The notebooks under ``notebooks/`` run top to bottom, each in a fresh Jupyter kernel.

The kernel is reached over IPC (unix sockets named after a connection file in the
test's own directory), not TCP. Over TCP the kernel manager picks five free ports and
the kernel binds them a second or two later, once it has started; with two test workers
another process (a gloo group, the other worker's kernel client) can take one of them in
between. CI saw a kernel fail in that bind (its message cut from the log, most likely
``Address already in use``) as "Kernel didn't respond in 60 seconds". Socket paths of
one test's directory cannot be taken by another. nbclient shuts the kernel down when the
notebook ends, whatever its outcome; the kernel's process group (jupyter_client starts it
in a session of its own) is also adopted by ``tests/processes.py``, which ends it with
the test if anything leaves it running.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

import processes

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # a cell that runs longer fails the test
STARTUP_TIMEOUT_S = 120  # the kernel's start, beside another test worker


def kernel_manager(workdir: Path, kernel_name: str = "python3") -> AsyncKernelManager:
    """A kernel manager whose kernel listens on unix sockets under ``workdir``."""
    return AsyncKernelManager(
        kernel_name=kernel_name, transport="ipc", connection_file=str(workdir / "kernel.json")
    )


def test_the_notebooks_are_found():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_compare_runs.ipynb"]


def test_the_kernel_listens_on_unix_sockets_not_tcp_ports(tmp_path):
    async def run_one_cell(km: AsyncKernelManager) -> list[str]:
        await km.start_kernel(cwd=str(tmp_path))
        processes.adopt(km.provisioner.pgid)
        try:
            info = km.get_connection_info()
            assert info["transport"] == "ipc" and info["ip"].startswith(str(tmp_path))
            client = km.client()
            client.start_channels()
            try:
                await client.wait_for_ready(timeout=STARTUP_TIMEOUT_S)  # its sockets are bound
                sockets = sorted(p.name for p in tmp_path.iterdir() if p.is_socket())
                reply = await client.execute_interactive("x = 6 * 7", timeout=60)
                assert reply["content"]["status"] == "ok"
            finally:
                client.stop_channels()
        finally:
            await km.shutdown_kernel(now=True)
        assert not await km.is_alive()
        return sockets

    sockets = asyncio.run(run_one_cell(kernel_manager(tmp_path)))
    assert len(sockets) == 5, sockets  # shell, iopub, stdin, control, heartbeat


@pytest.mark.slow  # each runs whole pipelines
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_notebook_runs_top_to_bottom(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    km = kernel_manager(tmp_path, nb.metadata.kernelspec.name)
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, startup_timeout=STARTUP_TIMEOUT_S,
                            on_notebook_start=lambda **_: processes.adopt(km.provisioner.pgid))  # fmt: skip
    # raises CellExecutionError naming the cell; cleanup_kc: the kernel is shut down and
    # its channels closed however the notebook ends (nbclient leaves a kernel it did not
    # start running otherwise)
    client.execute(cwd=str(path.parent), cleanup_kc=True)
    assert not asyncio.run(km.is_alive())
    ran = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert ran and all(cell.execution_count is not None for cell in ran)
