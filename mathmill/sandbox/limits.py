"""Resource limits of one execution or session turn."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Limits"]


class Limits(BaseModel):
    """Limits applied to model-written code. Every field is enforced by the kernel or
    the supervisor, not by the code's good will.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: float = Field(10.0, gt=0, le=3600, description="Wall-clock limit.")
    cpu_s: int | None = Field(None, ge=1, le=3600, description="CPU limit; default timeout+1.")
    memory_mb: int = Field(1024, ge=16, le=65536, description="Address space beyond the baseline.")
    max_output_bytes: int = Field(
        1 << 20, ge=1024, le=1 << 28, description="stdout and stderr cap each; past it: killed."
    )
    max_file_mb: int = Field(16, ge=1, le=4096, description="Largest file the code may write.")
    disk_mb: int = Field(64, ge=1, le=65536, description="Size of the private job directory.")
    max_processes: int = Field(32, ge=1, le=4096, description="Processes and threads.")
    max_open_files: int = Field(256, ge=16, le=65536)

    @property
    def cpu_limit(self) -> int:
        """CPU seconds (defaults to the wall limit plus one)."""
        return self.cpu_s or int(self.timeout_s) + 1
