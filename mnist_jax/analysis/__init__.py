"""Everything `mnist-jax analyze` computes and writes, one module per concern:

* `dataset`: exact dataset statistics, mean images, samples;
* `runs`: which runs to read and what the report shows for each (curves, counts, ranking,
  mistakes), from the tolerant reader `mnist_jax.record.load_run`;
* `compare`: the comparison rows, their order and runs.csv;
* `sweeps`, `sweep_plots`: a sweep directory's trial and spread tables, CSV files, section and
  figure (its trials are runs like any other);
* `sections`, `plots`, `run_plots`, `report`: the report's sections, figures and HTML;
* `build`: `analyze()`, the entry point that ties them together.
"""

from mnist_jax.analysis.build import analyze
from mnist_jax.analysis.compare import (
    COMPARISON_COLUMNS,
    CONFIG_COLUMNS,
    METRIC_COLUMNS,
    MODEL_COLUMNS,
    TRAIN_GFLOPS,
    comparison_row,
    model_columns,
    sort_rows,
    write_runs_csv,
)
from mnist_jax.analysis.dataset import (
    class_mean_images,
    dataset_stats,
    mean_image,
    pixel_stats,
    pixel_value_counts,
    sample_images,
    split_stats,
)
from mnist_jax.analysis.runs import (
    GALLERY_SIZE,
    Found,
    Mistakes,
    Ranking,
    RunAnalysis,
    analyze_run,
    find_records,
    find_runs,
    learning_curves,
    per_class_scores,
    ranking,
    top_mistakes,
)
from mnist_jax.analysis.sections import SAMPLES_PER_CLASS
from mnist_jax.analysis.sweeps import SweepAnalysis, analyze_sweep
from mnist_jax.record import Predictions, Run, load_run

__all__ = [
    "COMPARISON_COLUMNS",
    "CONFIG_COLUMNS",
    "GALLERY_SIZE",
    "Found",
    "METRIC_COLUMNS",
    "MODEL_COLUMNS",
    "SAMPLES_PER_CLASS",
    "Mistakes",
    "Predictions",
    "Ranking",
    "Run",
    "RunAnalysis",
    "SweepAnalysis",
    "TRAIN_GFLOPS",
    "analyze",
    "analyze_run",
    "analyze_sweep",
    "class_mean_images",
    "comparison_row",
    "dataset_stats",
    "find_records",
    "find_runs",
    "learning_curves",
    "load_run",
    "mean_image",
    "model_columns",
    "per_class_scores",
    "pixel_stats",
    "pixel_value_counts",
    "ranking",
    "sample_images",
    "sort_rows",
    "split_stats",
    "top_mistakes",
    "write_runs_csv",
]
