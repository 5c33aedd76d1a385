// margin.cuh: the angular margins on the target cosine, the kernel side of
// src/head/margin.rs (Margin::target). Shared by the code head and the O(N)
// softmax heads.
#pragma once
#include "common.cuh"

// f(c) and f'(c) (exact) of the margin on the target cosine.
struct Target {
  float f, df;
};
// margin: 0 none, 1 ArcFace, 2 CosFace; cm = cos m, sm = sin m (from the
// host, so the kernel needs no trigonometry).
GIF_DEVICE Target margin_target(float c, int margin, float m, float cm, float sm) {
  if (margin == 2) return Target{c - m, 1.0f};
  if (margin == 1) {
    if (c > -cm) {  // θ + m < π, i.e. c > cos(π − m) = −cos m
      const float cc = fminf(c, 1.0f);
      const float sin_t = sqrtf(fmaxf(1.0f - cc * cc, 1e-12f));
      return Target{cc * cm - sin_t * sm, cm + cc * sm / sin_t};
    }
    return Target{c - m * sm, 1.0f};
  }
  return Target{c, 1.0f};
}

