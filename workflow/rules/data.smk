rule data:
    output:
        train=str(P.train),
        test=str(P.test),
    log:
        str(P.logs("data")),
    shell:
        rlhf("data")
