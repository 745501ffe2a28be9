"""Screenshot of the explorer page comparing the base and its adapters on a held-out question (docs/explorer.png).

    lorakit serve --model smollm2-135m-instruct --adapter quickstart=runs/quickstart \\
        --adapter detox=runs/local/bloom-1b1-detox
    python docs/screenshot.py http://127.0.0.1:8000 docs/explorer.png

It picks the first held-out example of the quickstart run, sends it to every model and waits for the columns.
"""

import sys

from playwright.sync_api import sync_playwright


def main(url: str, out: str) -> None:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(300_000)
        page.goto(url)
        page.locator("#example optgroup option").first.wait_for(state="attached")
        page.select_option("#example", index=1)
        page.click("#send")
        page.locator("#columns .column[data-model]").first.wait_for()
        for state in page.locator("#columns .column[data-model]").all():
            state.locator(".stats", has_text="finish:").wait_for()
        page.screenshot(path=out, full_page=True)
        for column in page.locator("#columns .column[data-model]").all():
            print(column.get_attribute("data-model"), column.locator(".stats").inner_text())
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
