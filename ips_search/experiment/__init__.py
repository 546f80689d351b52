"""The experiment's on-disk contract, shared by the search that writes it and the report that reads it.

Imports neither Ray nor torch: settings and their rules (:mod:`.settings`), trial statuses (:mod:`.status`), the
trial record and its columns (:mod:`.record`), the folder's files and ``experiment.json`` (:mod:`.files`), and the
ranking rule (:mod:`.ranking`).
"""

from ips_search.experiment.files import (
    CHECKPOINT_FILE,
    EXPERIMENT_FILE,
    JOURNAL_FILE,
    LOG_FILE,
    PARAMS_FILE,
    REPORT_DIR,
    RESULT_FILE,
    TOOL,
    TRAINABLE_NAME,
    TRIALS_CSV,
    read_experiment,
    update_settings,
    write_experiment,
)
from ips_search.experiment.ranking import best, completed, finite, pareto_front, rank
from ips_search.experiment.record import (
    COLUMN_NAMES,
    COLUMNS,
    MEMORY_METRIC,
    METRIC,
    Column,
    EpochReport,
    MemoryKind,
    as_bool,
    best_of,
    coerce,
    trial_record,
)
from ips_search.experiment.settings import (
    OBJECTIVES,
    SAMPLERS,
    SCHEDULERS,
    SearchSettings,
    asha_rungs,
    check_positive,
    check_settings,
    settings_from_saved,
)
from ips_search.experiment.status import ORDER, STOPPED, Status, trial_status

__all__ = [
    "CHECKPOINT_FILE",
    "COLUMNS",
    "COLUMN_NAMES",
    "EXPERIMENT_FILE",
    "JOURNAL_FILE",
    "LOG_FILE",
    "MEMORY_METRIC",
    "METRIC",
    "OBJECTIVES",
    "ORDER",
    "PARAMS_FILE",
    "REPORT_DIR",
    "RESULT_FILE",
    "SAMPLERS",
    "SCHEDULERS",
    "STOPPED",
    "TOOL",
    "TRAINABLE_NAME",
    "TRIALS_CSV",
    "Column",
    "EpochReport",
    "MemoryKind",
    "SearchSettings",
    "Status",
    "as_bool",
    "asha_rungs",
    "best",
    "best_of",
    "check_positive",
    "check_settings",
    "coerce",
    "completed",
    "finite",
    "pareto_front",
    "rank",
    "read_experiment",
    "settings_from_saved",
    "trial_record",
    "trial_status",
    "update_settings",
    "write_experiment",
]
