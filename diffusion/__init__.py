"""The paper's maths, pure torch, one formula per file, each with its test beside it in tests/:

schedule (shifted-cosine logSNR), parameterization (v and its x / eps conversions), loss (min-SNR
v-loss, label dropout), wavelet (Haar), noise (the shared (eps, t) pairs), classify (the error
matrix), voting (votes, entropy, scores), early_exit, sampler (guided DDIM), explain
(counterfactuals and difference maps). Nothing here knows Lightning, files or configs.
"""
