"""`bloger report`: an HTML page (and its PNG figures) of the runs of one or several workspaces.

    collect.py  the runs, their test metrics, histories and semantic IDs, from catalogs and artifacts
    figures.py  matplotlib figures (the optional `plot` extra)
    html.py     the self-contained page
    results.py  the reproduction results file of `make -C pipelines NAME` (NAME.md, NAME.json)
    stage.py    `run`: the command's library function

Read-only over the workspaces: it runs beside a training and records no run.
"""
