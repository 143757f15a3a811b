"""Position tables fed to the ONNX graphs as inputs (numpy only).

They are built in `lofi.acestep.tables` (no ML framework), the one place shared with the MLX
networks and the torch port; this module keeps the names the CUDA engine and the exporter use.
"""

from lofi.acestep.tables import (TIME_CHANNELS, relative_index, relative_positions, rope_tables,
                             t5_buckets, time_frequencies)

__all__ = ["TIME_CHANNELS", "relative_index", "relative_positions", "rope_tables", "t5_buckets",
           "time_frequencies"]
