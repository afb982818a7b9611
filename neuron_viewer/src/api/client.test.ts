import { describe, expect, it } from "vitest";
import { splitToken, tokenMessage } from "./client";

describe("splitToken", () => {
  it("takes the access token out of the query and keeps the rest in order", () => {
    expect(splitToken("?prompt=Hi+there&access_token=s3cr%2Bt&target=+Mary")).toEqual({
      token: "s3cr+t",
      search: "?prompt=Hi+there&target=+Mary",
    });
    expect(splitToken("?access_token=abc")).toEqual({ token: "abc", search: "" });
  });

  it("leaves a query without an access token as it is", () => {
    expect(splitToken("")).toEqual({ token: null, search: "" });
    expect(splitToken("?api=http%3A%2F%2Fhost%3A8000")).toEqual({
      token: null,
      search: "?api=http%3A%2F%2Fhost%3A8000",
    });
    expect(splitToken("?access_token=")).toEqual({ token: null, search: "" });
    // A component page's `token` is a token index, not the access token.
    expect(splitToken("?prompt=Hi&token=3")).toEqual({ token: null, search: "?prompt=Hi&token=3" });
  });
});

describe("tokenMessage", () => {
  it("says how to give the token, and whether the page had one", () => {
    expect(tokenMessage(false)).toMatch(/^This server requires an access token: .*\?access_token=/);
    expect(tokenMessage(true)).toMatch(/^The server refused this page's access token/);
  });
});
