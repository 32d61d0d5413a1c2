// Per-coefficient factors of the relay operators (SPEC sections 2 and 6), shared by the
// CPU and CUDA kernels. Computed in double: they are O(p^2) numbers per sample.
#pragma once

#include <cmath>

#include "philox.h"  // RD_HD

namespace relaydiff {

constexpr double kPi = 3.14159265358979323846;

// a_tau(k, l) = (1 - m) exp(-(pi^2 / p^2)(k^2 + l^2) tau) + m
RD_HD double blur_factor(int k, int l, int p, double tau, double min_scale) {
  const double freq = kPi * kPi / (static_cast<double>(p) * p) * (k * k + l * l);
  return (1.0 - min_scale) * exp(-freq * tau) + min_scale;
}

// One relay step from sigma to sigma_next (SPEC 6): x_n = IDCT(A DCT(x) + B DCT(y)) + eta n,
// with y = sigma * d. A and B depend on the coefficient (k, l); eta does not.
struct StepCoef {
  double A, B;
};

RD_HD double step_gamma(double s_noise, double sigma, double sigma_next) {
  return sqrt(1.0 - s_noise * s_noise) * sigma_next / sigma;
}

RD_HD StepCoef step_coef(int k, int l, int p, double tau, double tau_next, double gamma,
                         double min_scale) {
  const double a_c = blur_factor(k, l, p, tau, min_scale);
  const double a_n = blur_factor(k, l, p, tau_next, min_scale);
  return {a_n + gamma * (1.0 - a_c), gamma * a_c - a_n};
}

}  // namespace relaydiff
