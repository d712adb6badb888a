rule report:
    input:
        evals=[str(P.evaluation(SFT_EVAL, config["seed"]))]
        + [str(P.evaluation(m, s)) for m in METHODS for s in SEEDS],
        policies=[str(P.policy(m, s)) for m in METHODS for s in SEEDS],
    output:
        directory(str(P.report)),
    log:
        str(P.logs("report")),
    shell:
        rlhf("report")
