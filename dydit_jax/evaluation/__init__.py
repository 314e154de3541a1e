"""The ADM evaluation suite in JAX: the FID Inception (`inception`), its weights (`weights`,
`convert`), batched activations (`features`), FID / sFID / IS (`metrics`), precision / recall
(`manifold`) and the reference / sample batches (`batches`); `python -m dydit_jax.evaluate` runs it."""
