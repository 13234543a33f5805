// One question to a local model through libchat's C++ wrapper, the answer streamed to stdout as
// it is generated.
//
//   c++ -std=c++17 chat.cpp -I../../bindings/cpp $(pkg-config --cflags --libs libchat) -o chat
//   ./chat MODEL_DIR ["question"] [--print-response]
//
// --print-response prints the final response JSON (with usage and finish_reason) after the answer.
#include <cstdio>
#include <iostream>
#include <string>
#include <string_view>

#include <libchat.hpp>

// `s` as a JSON string literal (quotes and escapes included).
static std::string json_string(std::string_view s) {
    std::string out = "\"";
    for (char ch : s) {
        unsigned char c = static_cast<unsigned char>(ch);
        if (c == '"' || c == '\\') {
            out += '\\';
            out += ch;
        } else if (c < 0x20) {
            char escape[7];
            std::snprintf(escape, sizeof escape, "\\u%04x", c);
            out += escape;
        } else {
            out += ch;
        }
    }
    return out + '"';
}

int main(int argc, char** argv) {
    if (argc < 2) {
        std::cerr << "usage: " << argv[0] << " MODEL_DIR [\"question\"] [--print-response]\n";
        return 2;
    }
    std::string question = "What is the capital of France?";
    bool print_response = false;
    for (int i = 2; i < argc; i++) {
        if (std::string_view(argv[i]) == "--print-response")
            print_response = true;
        else
            question = argv[i];
    }

    try {
        const libchat::Engine engine("{\"model\": " + json_string(argv[1]) + "}");
        std::string request = "{\"messages\": [{\"role\": \"user\", \"content\": " + json_string(question) +
                              "}], \"max_tokens\": 64, \"temperature\": 0}";
        std::string response = engine.chat_stream(request, [](std::string_view piece) {
            std::cout << piece << std::flush;
            return true;  // ask for more
        });
        std::cout << '\n';
        if (print_response)
            std::cout << response << '\n';
    } catch (const std::exception& e) {
        std::cerr << argv[0] << ": " << e.what() << '\n';
        return 1;
    }
    return 0;
}
