"""Reports: figures and tables."""

from memsafe.report.figures import save_image_grid, save_loss_curve, save_nearest_grid
from memsafe.report.table import metrics_table

__all__ = ["metrics_table", "save_image_grid", "save_loss_curve", "save_nearest_grid"]
