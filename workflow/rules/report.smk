rule certify:
    input:
        test=str(P.test),
        sft=str(P.sft),
        rm=str(P.rm),
    output:
        directory(str(P.certify)),
    priority: 10  # start beside the first GRPO jobs instead of idling a core at the end
    conda:
        conda_env("certify")
    threads: threads("certify")
    resources:
        **job_resources("certify"),
    log:
        str(P.logs("certify")),
    shell:
        rlhf("certify")


rule report:
    input:
        evals=[str(P.evaluation(SFT_EVAL, config["seed"]))]
        + [str(P.evaluation(m, s)) for m in METHODS for s in SEEDS],
        policies=[str(P.policy(m, s)) for m in METHODS for s in SEEDS],
        certify=str(P.certify),
    output:
        directory(str(P.report)),
    conda:
        conda_env("report")
    threads: threads("report")
    resources:
        **job_resources("report"),
    log:
        str(P.logs("report")),
    shell:
        rlhf("report")
