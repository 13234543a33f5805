use super::*;

/// Samples `n` tokens from fresh samplers (penalties see no history) and counts each token.
fn histogram(params: &SamplingParams, logits: &[f32], n: usize, seed: u64) -> Vec<usize> {
    let mut counts = vec![0; logits.len()];
    let mut rng = Rng::seeded(seed);
    for _ in 0..n {
        let mut s = Sampler::new(params.clone(), &[], Rng::seeded(rng.next_u64()));
        let mut l = logits.to_vec();
        counts[s.sample(&mut l, &[]) as usize] += 1;
    }
    counts
}

fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut p = SamplingParams::default();
    f(&mut p);
    p
}

// ln of probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625
const LN2: f32 = std::f32::consts::LN_2;
const LOGITS: [f32; 5] = [-LN2, -2.0 * LN2, -3.0 * LN2, -4.0 * LN2, -4.0 * LN2];

#[test]
fn temperature_zero_is_greedy() {
    let h = histogram(&params(|p| p.temperature = 0.0), &LOGITS, 200, 1);
    assert_eq!(h[0], 200);
}

#[test]
fn temperature_one_follows_the_softmax() {
    let n = 20_000;
    let h = histogram(&SamplingParams::default(), &LOGITS, n, 2);
    for (i, expected) in [0.5, 0.25, 0.125, 0.0625, 0.0625].iter().enumerate() {
        let got = h[i] as f64 / n as f64;
        assert!((got - expected).abs() < 0.015, "token {i}: {got} vs {expected}");
    }
}

#[test]
fn low_temperature_sharpens_and_high_temperature_flattens() {
    let cold = histogram(&params(|p| p.temperature = 0.3), &LOGITS, 5000, 3);
    let hot = histogram(&params(|p| p.temperature = 2.0), &LOGITS, 5000, 3);
    assert!(cold[0] > 4300, "expected ~90% for the best token: {cold:?}");
    assert!(hot[0] < 1900 && hot[4] > 500, "expected ~34% and ~12%: {hot:?}");
}

#[test]
fn top_k_keeps_only_the_k_best() {
    let h = histogram(&params(|p| p.top_k = 2), &LOGITS, 3000, 4);
    assert_eq!(h[2] + h[3] + h[4], 0);
    let ratio = h[0] as f64 / h[1] as f64;
    assert!((ratio - 2.0).abs() < 0.3, "renormalised 2:1, got {ratio}");
}

#[test]
fn top_p_keeps_the_smallest_nucleus() {
    // 0.5 + 0.25 = 0.75 >= 0.7: tokens 0 and 1 only.
    let h = histogram(&params(|p| p.top_p = 0.7), &LOGITS, 3000, 5);
    assert_eq!(h[2] + h[3] + h[4], 0);
    assert!(h[1] > 700);
    // 0.8 needs the third token too.
    let h = histogram(&params(|p| p.top_p = 0.8), &LOGITS, 3000, 5);
    assert!(h[2] > 0 && h[3] + h[4] == 0, "{h:?}");
}

#[test]
fn top_p_is_exact_on_a_large_flat_vocabulary() {
    // 40_000 equally likely tokens: the nucleus for 0.5 is half of them, found through the
    // falling threshold rather than a full sort.
    let logits = vec![0.0f32; 40_000];
    let h = histogram(&params(|p| p.top_p = 0.5), &logits, 4000, 6);
    let distinct = h.iter().filter(|&&c| c > 0).count();
    assert!(distinct > 3000, "{distinct}");
}

#[test]
fn min_p_drops_tokens_below_a_fraction_of_the_best() {
    // min_p 0.3: keep p >= 0.15, i.e. tokens 0 and 1.
    let h = histogram(&params(|p| p.min_p = 0.3), &LOGITS, 3000, 7);
    assert_eq!(h[2] + h[3] + h[4], 0);
    assert!(h[1] > 700);
}

#[test]
fn logit_bias_can_force_or_forbid_a_token() {
    let h = histogram(&params(|p| p.logit_bias = vec![(4, 100.0)]), &LOGITS, 500, 8);
    assert_eq!(h[4], 500);
    let h = histogram(&params(|p| p.logit_bias = vec![(0, -100.0)]), &LOGITS, 500, 8);
    assert_eq!(h[0], 0);
}

#[test]
fn banned_tokens_are_never_picked() {
    let mut s = Sampler::new(params(|p| p.temperature = 0.0), &[], Rng::seeded(0));
    let mut l = LOGITS.to_vec();
    assert_eq!(s.sample(&mut l, &[0]), 1);
}

#[test]
fn frequency_and_presence_penalties_push_away_generated_tokens() {
    let flat = [0.0f32; 4];
    for p in [
        params(|p| {
            p.temperature = 0.0;
            p.presence_penalty = 0.5
        }),
        params(|p| {
            p.temperature = 0.0;
            p.frequency_penalty = 0.5
        }),
    ] {
        let mut s = Sampler::new(p, &[], Rng::seeded(0));
        let picks: Vec<u32> = (0..4).map(|_| s.sample(&mut flat.to_vec(), &[])).collect();
        let mut sorted = picks.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3], "each pick is penalised away: {picks:?}");
    }
    // Frequency grows with the count, presence does not.
    let mut s = Sampler::new(
        params(|p| {
            p.temperature = 0.0;
            p.frequency_penalty = 1.0
        }),
        &[],
        Rng::seeded(0),
    );
    let logits = [3.0f32, 0.5];
    let picks: Vec<u32> = (0..4).map(|_| s.sample(&mut logits.to_vec(), &[])).collect();
    assert_eq!(picks, vec![0, 0, 0, 1]);
    let mut s = Sampler::new(
        params(|p| {
            p.temperature = 0.0;
            p.presence_penalty = 1.0
        }),
        &[],
        Rng::seeded(0),
    );
    let picks: Vec<u32> = (0..4).map(|_| s.sample(&mut logits.to_vec(), &[])).collect();
    assert_eq!(picks, vec![0, 0, 0, 0]);
}

#[test]
fn repetition_penalty_covers_the_prompt_and_scales_by_sign() {
    let p = params(|p| {
        p.temperature = 0.0;
        p.repetition_penalty = 2.0
    });
    let mut s = Sampler::new(p.clone(), &[0], Rng::seeded(0));
    // token 0 (prompt): 3.0 / 2 = 1.5 < 2.0
    assert_eq!(s.sample(&mut [3.0, 2.0], &[]), 1);
    let mut s = Sampler::new(p, &[1], Rng::seeded(0));
    // token 1 (prompt): -1.0 * 2 = -2.0 < -1.5
    assert_eq!(s.sample(&mut [-1.5, -1.0], &[]), 0);
}

#[test]
fn same_seed_same_tokens_different_seed_different_tokens() {
    let logits: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32 / 300.0).collect();
    let run = |seed| {
        let mut s = Sampler::new(SamplingParams::default(), &[], Rng::seeded(seed));
        (0..50).map(|_| s.sample(&mut logits.clone(), &[])).collect::<Vec<u32>>()
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
}

#[test]
fn logprobs_are_a_normalised_log_softmax() {
    let mut scratch = Vec::new();
    let lp = logprobs(&LOGITS, 1, 3, &mut scratch);
    assert!((lp.logprob - 0.25f32.ln()).abs() < 1e-5);
    assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert!((lp.top[0].1 - 0.5f32.ln()).abs() < 1e-5);
}
