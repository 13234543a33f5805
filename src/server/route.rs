//! Every route the server answers, declared once: its method, its path (the label it is
//! counted under in `/metrics`) and what answers it. Unknown paths are counted as "other", so
//! that scanners probing random paths cannot grow the label set.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    ChatCompletions,
    Completions,
    Models,
    /// `/v1/models/{id}`.
    Model,
    Health,
    Metrics,
    Tokenize,
    Detokenize,
    ApplyTemplate,
}

/// Each route with its method and path; a path ending in `{id}` matches any last segment.
const ROUTES: [(Route, &str, &str); 9] = [
    (Route::ChatCompletions, "POST", "/v1/chat/completions"),
    (Route::Completions, "POST", "/v1/completions"),
    (Route::Models, "GET", "/v1/models"),
    (Route::Model, "GET", "/v1/models/{id}"),
    (Route::Health, "GET", "/health"),
    (Route::Metrics, "GET", "/metrics"),
    (Route::Tokenize, "POST", "/tokenize"),
    (Route::Detokenize, "POST", "/detokenize"),
    (Route::ApplyTemplate, "POST", "/apply-template"),
];

impl Route {
    /// The route a path names, if any.
    pub fn of(path: &str) -> Option<Route> {
        ROUTES.iter().find(|(_, _, pattern)| matches(pattern, path)).map(|(route, _, _)| *route)
    }

    fn entry(self) -> &'static (Route, &'static str, &'static str) {
        ROUTES.iter().find(|(route, _, _)| *route == self).expect("every route is in ROUTES")
    }

    pub fn method(self) -> &'static str {
        self.entry().1
    }

    /// The path as declared (`{id}` not filled in): the `endpoint` label in `/metrics`.
    pub fn label(self) -> &'static str {
        self.entry().2
    }

    /// The `endpoint` label for any path.
    pub fn label_of(path: &str) -> &'static str {
        Route::of(path).map_or("other", Route::label)
    }
}

fn matches(pattern: &str, path: &str) -> bool {
    match pattern.strip_suffix("{id}") {
        // An empty id is a route too: `/v1/models/` is a 404 naming the model "".
        Some(prefix) => path.starts_with(prefix),
        None => pattern == path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_find_their_routes_and_labels() {
        assert_eq!(Route::of("/v1/models/x"), Some(Route::Model));
        assert_eq!(Route::of("/v1/models"), Some(Route::Models));
        assert_eq!(Route::of("/v1/models/"), Some(Route::Model));
        assert_eq!(Route::label_of("/v1/models/anything"), "/v1/models/{id}");
        assert_eq!(Route::label_of("/wp-login.php"), "other");
        assert_eq!(Route::Tokenize.method(), "POST");
        for (route, _, pattern) in ROUTES {
            assert_eq!(route.label(), pattern);
        }
    }
}
