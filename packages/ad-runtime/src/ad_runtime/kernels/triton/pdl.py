"""Programmatic dependent launch (Hopper and newer) for the kernels of a decode step.

A decode step at batch 1 is ~360 small kernels one after another; between two of them the GPU drains the first
and ramps up the second (4% of the step sat idle on an H200, and each kernel's start waits for the launch). With
PDL a kernel is launched while its predecessor's last programs still run: its programs start, wait at
`griddepcontrol.wait` until the predecessor's writes are visible, and only then read. Each kernel (with USE_PDL)
begins with

    if USE_PDL:
        cuda.gdc_wait()               # everything before this kernel in the stream has finished
        cuda.gdc_launch_dependents()  # the next kernel may launch now

so a kernel never reads before everything before it finished. A kernel whose successor's programs are heavy
(the skinny GEMM where its grid is more than one wave, and decode attention from two rows, whose successor is the
skinny GEMM) triggers at its end instead: programs launched early sit on the SMs waiting, holding shared memory
the running kernel's later programs need (`benchmarks/gpu/skinny_gemm_bench.py --layer`). AUTODEPLOY_TRITON_PDL=0
turns it off (to compare; an AD_-prefixed name would be read as a configuration field and warned about).
"""

import os
from functools import cache

import torch


@cache
def _supported(device: torch.device) -> bool:
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def pdl_launch_args(device: torch.device) -> dict:
    """Keyword arguments of a kernel launch: USE_PDL for the kernel, and launch_pdl where PDL is on."""
    on = os.environ.get("AUTODEPLOY_TRITON_PDL", "1") != "0" and _supported(device)
    return {"USE_PDL": True, "launch_pdl": True} if on else {"USE_PDL": False}
