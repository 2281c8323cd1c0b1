"""One partition per click source; new sources are added at run time, not in code."""

import dagster as dg

click_source_partitions = dg.DynamicPartitionsDefinition(name="click_source")

#: Sources that need no files: registered by ``make run`` / ``adrec_assets.cli register``.
BUILTIN_SOURCES: tuple[str, ...] = ("synthetic",)
