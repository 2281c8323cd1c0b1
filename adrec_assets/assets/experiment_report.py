"""experiment_report: every declared A/B experiment of a source, analysed from the served log.

Partitioned by click source (the partitions the pipeline already has): the service serves
one source, logs every event of it in that source's event log with the experiment arms the
request was assigned to, and reads one experiments file; so a source's report covers every
experiment that ran on it, one section each. The analysis is
:func:`adrec_assets.abtest.report.analyze_experiment` (delta-method CIs with users as the
unit, lift, SRM, CUPED with pre-experiment clicks, always-valid mSPRT p-values over hourly
looks). The mSPRT's mixture variance is fixed by an experiment's first report and reused by
every later one, so materializing this asset every hour (the schedule does) is safe.
"""

import base64
from datetime import UTC

import dagster as dg
import pandas as pd

from adrec_assets.abtest.report import (
    ExperimentReports,
    analyze_experiment,
    look_tables,
    per_user_table,
    report_figures,
    slot_shares,
)
from adrec_assets.abtest.stats import AnalysisInputError, SequentialDesign
from adrec_assets.assets.common import PARTITION_KWARGS
from adrec_assets.online.events import read_event_log
from adrec_assets.online.experiments import EXPLODED_COLUMNS, explode_event_log
from adrec_assets.resources import ArtifactStoreResource, ClickSourceResource, ExperimentsResource

EXPERIMENTS_GROUP = "experiments"
LOOK_SECONDS = 3600  # one look per hour of the experiment


def _previous_designs(
    context: dg.AssetExecutionContext, artifacts: ArtifactStoreResource
) -> dict[str, SequentialDesign]:
    path = artifacts.report_path(context.partition_key, "experiment_report")
    if not path.exists():
        return {}
    from adrec_assets.artifacts import load_file

    try:
        return load_file(path).designs
    except Exception as exc:  # noqa: BLE001 - a lost design is re-derived, and said so
        context.log.warning(f"previous experiment report {path} unreadable ({exc}); designs are derived again")
        return {}


@dg.asset(io_manager_key="report_io_manager", kinds={"pandas"}, group_name=EXPERIMENTS_GROUP, **PARTITION_KWARGS)
def experiment_report(
    context: dg.AssetExecutionContext,
    click_sources: ClickSourceResource,
    experiments: ExperimentsResource,
    artifacts: ArtifactStoreResource,
) -> dg.Output[ExperimentReports]:
    """Per experiment and arm: users, impressions, clicks, CTR with a delta-method CI, relative
    lift with its CI, CUPED lift, p-values (fixed-horizon and always-valid), the
    sample-ratio check (failing asset check below p = 0.001), and exploration's cost: the
    shares of impressions on fresh ads and on exploratory slots."""
    declared = experiments.load()
    log = read_event_log(click_sources.sources_root() / context.partition_key).to_pandas()
    exploded = explode_event_log(log) if len(log) else pd.DataFrame(columns=list(EXPLODED_COLUMNS))
    designs = _previous_designs(context, artifacts)
    sections, figures, metadata = [], [], {}
    for experiment in declared.experiments:
        start = experiment.start.astimezone(UTC).timestamp()
        events = exploded[exploded["experiment"] == experiment.name]
        pre = (
            log[(log["type"] == "click") & (log["timestamp"] < start)].groupby("user_pseudonym").size()
            if len(log)
            else None
        )
        if events.empty:
            sections.append(f"### Experiment `{experiment.name}`\n\nNo served events yet.\n")
            continue
        last = float(events["timestamp"].max())
        looks = [t for t in range(int(start) + LOOK_SECONDS, int(last) + 1, LOOK_SECONDS)]
        try:
            report = analyze_experiment(
                per_user_table(events, experiment.name, pre),
                experiment.shares,
                experiment=experiment.name,
                sequential=designs.get(experiment.name),
                looks=look_tables(events, experiment.name, looks, pre) if looks else (),
                slots=slot_shares(events, experiment.name, list(experiment.shares)),
            )
        except AnalysisInputError as exc:
            sections.append(f"### Experiment `{experiment.name}`\n\nNot analysable yet: {exc}\n")
            continue
        designs.setdefault(experiment.name, report.sequential)
        image = base64.b64encode(report.plot_png()).decode()
        sections.append(report.markdown() + f"\n![{experiment.name}](data:image/png;base64,{image})\n")
        figures += report_figures(report)
        metadata[f"{experiment.name}_srm_p_value"] = dg.MetadataValue.float(float(report.srm.p_value))
        for comparison in report.comparisons:
            metadata[f"{experiment.name}_{comparison.arm}_lift"] = dg.MetadataValue.float(comparison.lift)
            metadata[f"{experiment.name}_{comparison.arm}_always_valid_p"] = dg.MetadataValue.float(
                comparison.always_valid_p_value
            )
    markdown = "\n".join(sections) if sections else "No experiments are declared (set ADREC_EXPERIMENTS)."
    return dg.Output(
        ExperimentReports(markdown, designs, figures),
        metadata={
            "report": dg.MetadataValue.md(markdown),
            "n_experiments": len(declared.experiments),
            "n_events": len(log),
            **metadata,
        },  # fmt: skip
    )
