"""relaydiff.analysis: the frequency analysis of the paper (Fig. 2, Fig. 8, App. D; SPEC 10)."""
from .noise_study import (NOISE_KINDS, FrequencyStudy, frequency_study, frequency_study_stream, low_resolution,
                          make_noise, nearest_upsample)
from .photos import center_square, photo_batch, photo_batches
from .spectrum import (MAX_FREQ, RadialBins, bin_mean, dct2, high_frequency_error, radial_bins, radial_psd,
                       snr_curve)

__all__ = ["NOISE_KINDS", "FrequencyStudy", "frequency_study", "frequency_study_stream", "low_resolution",
           "make_noise", "nearest_upsample", "center_square", "photo_batch", "photo_batches", "MAX_FREQ",
           "RadialBins", "bin_mean", "dct2", "high_frequency_error", "radial_bins", "radial_psd", "snr_curve"]
