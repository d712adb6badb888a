rule grpo:
    input:
        train=str(P.train),
        test=str(P.test),
        sft=str(P.sft),
        rm=str(P.rm),
    output:
        directory(str(P.policy("{method}", "{seed}"))),
    conda:
        conda_env("grpo")
    threads: threads("grpo")
    resources:
        **job_resources("grpo"),
    log:
        str(P.logs("grpo_{method}_seed{seed}")),
    shell:
        rlhf("grpo", "--method {wildcards.method} --seed {wildcards.seed}")


rule evaluate:
    input:
        policy=lambda w: str(P.sft) if w.method == SFT_EVAL else str(P.policy(w.method, w.seed)),
        test=str(P.test),
        rm=str(P.rm),
    output:
        directory(str(P.evaluation("{method}", "{seed}"))),
    conda:
        conda_env("evaluate")
    threads: threads("evaluate")
    resources:
        **job_resources("evaluate"),
    log:
        str(P.logs("evaluate_{method}_seed{seed}")),
    shell:
        rlhf("evaluate", "--method {wildcards.method} --seed {wildcards.seed}")
