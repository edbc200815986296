"""`mnist-jax sweep`: many trials of one recipe, trained as one compiled program where they can.

`spec` reads a sweep spec and expands it into trial configs (stdlib only), `table` reads the
trials' records back into the sweep table, and `run` trains the trials: those whose programs are
the same (`steps.structure`) as one program mapped over a trial axis, or one after another
reusing one compiled program, whichever the backend does faster.
"""
