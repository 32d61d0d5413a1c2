"""relaydiff.metrics: FID, sFID, KID, Inception Score, precision/recall (offline TF-Inception
features), and the weight-free sliced Wasserstein distance, PSNR and SSIM.

See docs/evaluation.md for which numbers are comparable to published ones.
"""
from .evaluation import METRICS, evaluate
from .features import compute_stats, default_cache_dir
from .frechet import FeatureStats, RunningStats, frechet_distance, gaussian_stats, load_stats, matrix_sqrt
from .image_quality import psnr, ssim
from .images import ImageSource, open_images, to_uint8
from .inception import (InceptionFeatures, InceptionLayers, MissingWeightsError, bundled_inception_path,
                        load_inception, tf_bilinear_resize)
from .kid import kid, polynomial_mmd2
from .manifold import inception_score, knn_radii, precision_recall
from .swd import laplacian_pyramid, sliced_wasserstein, swd

__all__ = ["METRICS", "evaluate", "compute_stats", "default_cache_dir", "FeatureStats", "RunningStats",
           "frechet_distance", "gaussian_stats", "load_stats", "matrix_sqrt", "psnr", "ssim", "ImageSource",
           "open_images", "to_uint8", "InceptionFeatures", "InceptionLayers", "MissingWeightsError",
           "bundled_inception_path", "load_inception", "tf_bilinear_resize", "kid", "polynomial_mmd2",
           "inception_score", "knn_radii", "precision_recall", "laplacian_pyramid", "sliced_wasserstein", "swd"]
